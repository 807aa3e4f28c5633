"""Depth Anything V2 weights -> ``depth_anything.DepthAnything`` params, from either layout.

Two layouts are read:

- Hugging Face (``depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf``: ``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``; also what ``save_pretrained`` writes):
  ``backbone.*`` (transformers' Dinov2 names), ``neck.reassemble_stage.layers.N.{projection,
  resize}``, ``neck.convs.N``, ``neck.fusion_stage.layers.N.{projection,residual_layer1,
  residual_layer2}.{convolution1,convolution2}``, ``head.conv{1,2,3}``;
- the official ``depth_anything_v2_vit{s,b,l}.pth`` (DepthAnything/Depth-Anything-V2):
  ``pretrained.*`` (facebookresearch/dinov2 names), ``depth_head.projects.N``,
  ``depth_head.resize_layers.N``, ``depth_head.scratch.layerN_rn``,
  ``depth_head.scratch.refinenetN.{out_conv,resConfUnit1,resConfUnit2}.{conv1,conv2}``,
  ``depth_head.scratch.output_conv1``, ``depth_head.scratch.output_conv2.{0,2}``.

Official names are renamed to the Hugging Face ones (refinenet4, the deepest, is fusion
layer 0), the encoder's names to facebookresearch/dinov2's (``convert_v2v3``), then every
tensor is transposed to flax's layout. The deepest fusion layer's ``residual_layer1``
(``refinenet4.resConfUnit1``) exists in both checkpoints but is never used by either model;
it is dropped. Every other unknown, missing or misshapen key is an error naming it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.models import convert_v2v3, variants
from depthg_jax.models.depth_anything import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIL_BICUBIC,
    DepthAnything,
    DepthAnythingSpec,
    check_spec,
)

# DepthAnythingV2.intermediate_layer_idx (0-based) + 1, by encoder width.
OFFICIAL_LAYERS = {384: (3, 6, 9, 12), 768: (3, 6, 9, 12), 1024: (5, 12, 18, 24)}
# Files of the -hf repositories, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PreprocessSpec(dict):
    """The DPT processor's settings the JAX path follows (a plain dict with defaults)."""

    DEFAULTS = {
        "size": (518, 518),
        "multiple": 14,
        "keep_aspect_ratio": True,
        "resample": PIL_BICUBIC,
        "rescale": 1 / 255,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"unknown preprocessing settings {sorted(unknown)}")
        super().__init__({**self.DEFAULTS, **kwargs})


# ----------------------------------------------------------------------------- names

_OFFICIAL_HEAD = [
    (r"^depth_head\.projects\.(\d+)\.", r"neck.reassemble_stage.layers.\1.projection."),
    (r"^depth_head\.resize_layers\.(\d+)\.", r"neck.reassemble_stage.layers.\1.resize."),
    (r"^depth_head\.scratch\.layer(\d+)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
    (r"^depth_head\.scratch\.output_conv1\.", "head.conv1."),
    (r"^depth_head\.scratch\.output_conv2\.0\.", "head.conv2."),
    (r"^depth_head\.scratch\.output_conv2\.2\.", "head.conv3."),
]
_REFINENET = re.compile(r"^depth_head\.scratch\.refinenet(\d+)\.(\w+)\.(?:(conv\d)\.)?(\w+)$")
_REFINENET_PARTS = {"out_conv": "projection", "resConfUnit1": "residual_layer1",
                    "resConfUnit2": "residual_layer2"}  # fmt: skip


def is_official(state: dict[str, Any]) -> bool:
    return any(k.startswith(("depth_head.", "pretrained.")) for k in state)


def official_to_hf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official DA-V2 names -> Hugging Face names for the neck and head; the encoder's keep
    their facebookresearch/dinov2 names under ``backbone.`` (marked ``official``)."""
    n_fusion = len({m[1] for k in state if (m := _REFINENET.match(k))})
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith("pretrained."):
            out["official_backbone." + key.removeprefix("pretrained.")] = value
            continue
        if m := _REFINENET.match(key):
            index, part, conv, leaf = m.groups()
            if part not in _REFINENET_PARTS:
                raise ValueError(f"unknown key {key}")
            new = f"neck.fusion_stage.layers.{n_fusion - int(index)}.{_REFINENET_PARTS[part]}."
            conv = {"conv1": "convolution1.", "conv2": "convolution2."}.get(conv or "", "")
            out[new + conv + leaf] = value
            continue
        new = key
        for pattern, repl in _OFFICIAL_HEAD:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def split_backbone(state: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(official-named encoder state, HF-named neck and head state) of either layout."""
    if is_official(state):
        state = official_to_hf(state)
    encoder, rest, hf_encoder = {}, {}, {}
    for key, value in state.items():
        if key.startswith("official_backbone."):
            encoder[key.removeprefix("official_backbone.")] = value
        elif key.startswith("backbone."):
            hf_encoder[key.removeprefix("backbone.")] = value
        else:
            rest[key] = value
    if hf_encoder:
        encoder.update(convert_v2v3.rename_hf_v2(hf_encoder))
    return convert_v2v3.unchunk_blocks(encoder), rest


def infer_spec(state: dict[str, np.ndarray], layers=None, depth_type="relative", max_depth=1.0):
    """The DepthAnythingSpec of a state dict (either layout): the encoder variant from its
    shapes, the neck sizes and resize factors from the neck's tensors; ``layers`` default to
    the official choice for the encoder's width."""
    encoder, rest = split_backbone(state)
    info = convert_v2v3.detect(encoder)
    variant = convert_v2v3.guess_variant(info)
    if info.get("family") != "v2" or variant is None:
        raise ValueError(
            "the weights' encoder is not a known DINOv2 ViT: " + convert_v2v3.describe(info)
        )
    sizes, factors = [], []
    i = 0
    while f"neck.reassemble_stage.layers.{i}.projection.weight" in rest:
        sizes.append(int(rest[f"neck.reassemble_stage.layers.{i}.projection.weight"].shape[0]))
        resize = rest.get(f"neck.reassemble_stage.layers.{i}.resize.weight")
        if resize is None:
            factors.append(1)
        elif resize.shape[2] == resize.shape[3] == 3:  # a 3x3 stride-2 conv (DA: 0.5; never x3)
            factors.append(0.5)
        else:  # transposed conv, kernel = stride
            factors.append(int(resize.shape[2]))
        i += 1
    if not sizes or "neck.convs.0.weight" not in rest or "head.conv2.weight" not in rest:
        raise ValueError("the weights hold no Depth Anything neck and head (neck.*, head.*)")
    layers = tuple(layers) if layers else OFFICIAL_LAYERS.get(info["dim"])
    if layers is None:
        raise ValueError(f"no default intermediate layers for encoder width {info['dim']}")
    return DepthAnythingSpec(
        encoder=variant,
        layers=tuple(int(x) for x in layers),
        neck_hidden_sizes=tuple(sizes),
        fusion_hidden_size=int(rest["neck.convs.0.weight"].shape[0]),
        reassemble_factors=tuple(factors),
        head_hidden_size=int(rest["head.conv2.weight"].shape[0]),
        depth_type=depth_type,
        max_depth=float(max_depth),
    )


# ----------------------------------------------------------------------------- conversion


def _unused(key: str) -> bool:
    return key.startswith("neck.fusion_stage.layers.0.residual_layer1.")


def _flax_path(key: str) -> list[str]:
    *module, leaf = key.split(".")
    path = []
    for part in module:
        if part.isdigit():
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return [*path, {"weight": "kernel"}.get(leaf, leaf)]


def _to_flax(key: str, value: np.ndarray, factors: tuple[float, ...]) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if not key.endswith(".weight"):
        return value
    m = re.match(r"^neck\.reassemble_stage\.layers\.(\d+)\.resize\.weight$", key)
    if m and int(m[1]) < len(factors) and factors[int(m[1])] > 1:
        return value.transpose(2, 3, 0, 1)  # ConvTranspose2d (in, out, f, f) -> (f, f, in, out)
    return value.transpose(2, 3, 1, 0)  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)


def expected_neck_and_head(spec: DepthAnythingSpec) -> dict:
    """The abstract {"neck": ..., "head": ...} params (shapes only) of DepthAnything(spec)."""
    p = variants.patch_size(spec.encoder)
    images = jax.ShapeDtypeStruct((1, 4 * p, 4 * p, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: DepthAnything(spec).init(jax.random.key(0), x), images)
    return {k: v for k, v in shapes["params"].items() if k != "backbone"}


def convert_neck_and_head(state: dict[str, np.ndarray], factors: tuple[float, ...]) -> dict:
    """Hugging Face-named ``neck.*`` and ``head.*`` tensors -> {"neck": ..., "head": ...}
    (float32 numpy, flax layout); the never-used deepest ``residual_layer1`` is dropped.
    ``factors`` (the spec's reassemble factors) tell transposed (> 1) from strided resizes."""
    params: dict = {}
    for key, value in state.items():
        if _unused(key):
            continue
        if not key.startswith(("neck.", "head.")):
            raise ValueError(f"Depth Anything weights: unknown key {key}")
        tree = params
        path = _flax_path(key)
        for name in path[:-1]:
            tree = tree.setdefault(name, {})
        tree[path[-1]] = _to_flax(key, value, tuple(factors))
    return params


def convert_state_dict(state: dict[str, np.ndarray], spec: DepthAnythingSpec) -> dict:
    """Either layout's state dict -> DepthAnything(spec) "params" (float32 numpy)."""
    check_spec(spec)
    encoder, rest = split_backbone(state)
    params = convert_neck_and_head(rest, spec.reassemble_factors)
    _check_tree(params, expected_neck_and_head(spec))
    # The encoder's keys and shapes (position grid included) are checked by its converter.
    params["backbone"] = convert_v2v3.convert_state_dict_v2v3(encoder, spec.encoder)
    return params


def _check_tree(got: dict, want: dict) -> None:
    flat_got = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
    flat_want = {
        "/".join(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(want)
    }
    unknown, missing = (
        sorted(set(flat_got) - set(flat_want)),
        sorted(set(flat_want) - set(flat_got)),
    )
    if unknown or missing:
        raise ValueError(
            f"Depth Anything weights: unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''}, "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    for key, leaf in flat_want.items():
        if tuple(flat_got[key].shape) != tuple(leaf.shape):
            raise ValueError(f"{key}: expected shape {tuple(leaf.shape)}, got "
                             f"{tuple(flat_got[key].shape)}")  # fmt: skip


# ----------------------------------------------------------------------------- files


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .safetensors or torch .pth/.bin file -> {name: numpy array} (no torch needed)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    from depthg_jax.models import pth

    obj = pth.load_pth(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    return {re.sub(r"^module\.", "", k): np.asarray(v) for k, v in obj.items()}


def spec_from_hf_config(config: dict) -> DepthAnythingSpec:
    """A Hugging Face ``DepthAnythingConfig`` (config.json as a dict) -> DepthAnythingSpec.

    The encoder is the ``variants.VARIANTS`` DINOv2 of the backbone config's shape; settings the
    project's ViT does not implement are refused by name."""
    if config.get("model_type") != "depth_anything":
        raise ValueError(f"model_type {config.get('model_type')!r} is not 'depth_anything'")
    bb = config.get("backbone_config") or {}
    if bb.get("model_type", "dinov2") != "dinov2":
        raise ValueError(f"backbone {bb.get('model_type')!r}: the JAX path runs DINOv2 encoders")
    dim, depth = bb.get("hidden_size", 768), bb.get("num_hidden_layers", 12)
    heads, patch = bb.get("num_attention_heads", 12), bb.get("patch_size", 14)
    swiglu = bool(bb.get("use_swiglu_ffn", False))
    hidden = int(dim * bb.get("mlp_ratio", 4))
    refused = {
        "hidden_act": ("gelu", bb.get("hidden_act", "gelu")),
        "layer_norm_eps": (1e-6, bb.get("layer_norm_eps", 1e-6)),
        "qkv_bias": (True, bb.get("qkv_bias", True)),
        "apply_layernorm": (True, bb.get("apply_layernorm", True)),
        "num_channels": (3, bb.get("num_channels", 3)),
        "head_in_index": (-1, config.get("head_in_index", -1)),
        "reassemble_hidden_size": (dim, config.get("reassemble_hidden_size", dim)),
        "patch_size": (patch, config.get("patch_size", patch)),
    }
    for name, (want, got) in refused.items():
        if got != want:
            raise ValueError(f"Depth Anything config: {name}={got!r} is not supported ({want!r})")
    variant = next(
        (
            name
            for name, s in variants.VARIANTS.items()
            if (s.family, s.registers, s.dim, s.depth, s.heads, s.patch, s.swiglu, s.qkv_bias)
            == ("v2", 0, dim, depth, heads, patch, swiglu, True)
            and (swiglu or s.mlp_hidden == hidden)
        ),
        None,
    )
    if variant is None:
        raise ValueError(
            f"no DINOv2 variant in variants.VARIANTS with width {dim}, {depth} blocks, {heads} "
            f"heads, patch {patch}, MLP {hidden}"
        )
    layers = bb.get("out_indices")
    if not layers:
        names = bb.get("out_features") or [f"stage{depth}"]
        layers = [int(n.removeprefix("stage")) for n in names]
    spec = DepthAnythingSpec(
        encoder=variant,
        layers=tuple(int(i) for i in layers),
        neck_hidden_sizes=tuple(config.get("neck_hidden_sizes", (48, 96, 192, 384))),
        fusion_hidden_size=int(config.get("fusion_hidden_size", 64)),
        reassemble_factors=tuple(config.get("reassemble_factors", (4, 2, 1, 0.5))),
        head_hidden_size=int(config.get("head_hidden_size", 32)),
        depth_type=config.get("depth_estimation_type", "relative"),
        max_depth=float(config.get("max_depth") or 1.0),
    )
    check_spec(spec)
    return spec


def preprocess_from_hf(processor: dict) -> PreprocessSpec:
    """A saved ``DPTImageProcessor`` (preprocessor_config.json as a dict) -> PreprocessSpec.

    Settings absent from the file take DPTImageProcessor's defaults (384 x 384, no aspect
    kept, multiple of 1, bicubic, mean = std = 0.5), as transformers would."""
    if processor.get("do_pad") and processor.get("size_divisor"):
        raise ValueError("preprocessor pads to a size divisor: not a Depth Anything processor")
    size = processor.get("size", {"height": 384, "width": 384})
    if "height" not in size or "width" not in size:
        raise ValueError(f"preprocessor size {size}: expected height and width")
    mean = processor.get("image_mean", (0.5, 0.5, 0.5))
    std = processor.get("image_std", (0.5, 0.5, 0.5))
    if not processor.get("do_resize", True):
        raise ValueError("preprocessor does not resize: not a Depth Anything processor")
    return PreprocessSpec(
        size=(int(size["height"]), int(size["width"])),
        multiple=int(processor.get("ensure_multiple_of", 1)),
        keep_aspect_ratio=bool(processor.get("keep_aspect_ratio", False)),
        resample=int(processor.get("resample", PIL_BICUBIC)),
        rescale=float(processor.get("rescale_factor", 1 / 255))
        if processor.get("do_rescale", True)
        else 1.0,
        mean=tuple(mean) if processor.get("do_normalize", True) else (0.0, 0.0, 0.0),
        std=tuple(std) if processor.get("do_normalize", True) else (1.0, 1.0, 1.0),
    )


def load_hf_folder(path: str | os.PathLike) -> tuple[DepthAnythingSpec, dict, PreprocessSpec]:
    """A folder written by ``save_pretrained`` (or a downloaded -hf repository) ->
    (spec, params, preprocessing)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    spec = spec_from_hf_config(config)
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: none of {', '.join(WEIGHT_FILES)}")
    params = convert_state_dict(read_state_dict(weights), spec)
    proc_file = path / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
    return spec, params, preprocess_from_hf(proc) if proc else PreprocessSpec()


def load_official(path: str | os.PathLike) -> tuple[DepthAnythingSpec, dict, PreprocessSpec]:
    """An official ``depth_anything_v2_vit{s,b,l}.pth`` -> (spec, params, preprocessing); the
    preprocessing is that of the -hf processors (518, keep the aspect ratio, multiple of 14,
    bicubic, ImageNet statistics)."""
    state = read_state_dict(path)
    spec = infer_spec(state)
    return spec, convert_state_dict(state, spec), PreprocessSpec()
