"""DINOv2 / DINOv3 weights: key layouts, checks and conversion to Dinov2ViT / Dinov3ViT params.

Official names are the canonical ones (facebookresearch/dinov2 hub files such as
``dinov2_vits14_pretrain.pth``; facebookresearch/dinov3 ``dinov3_vits16_pretrain_*.pth``).
Hugging Face names (the ``facebook/dinov2-*``, ``facebook/dinov2-with-registers-*`` and
``facebook/dinov3-*`` safetensors, and transformers 5's in-memory ``state_dict`` names) are
mapped to them by ``rename_hf_v2`` / ``rename_hf_v3``; ``convert.py`` calls these.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from depthg_jax.models import state_dicts
from depthg_jax.models.variants import VARIANTS, get_variant, mlp_hidden

FAMILY_NAMES = {"v1": "DINO (v1)", "v2": "DINOv2", "v3": "DINOv3"}

# Gated: Meta hands out download links on request; the HF repos need an accepted licence.
DINOV3_FILES: dict[str, tuple[str, str]] = {
    "v3-S/16": ("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "dinov3-vits16-pretrain-lvd1689m"),
    "v3-S+/16": (
        "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
        "dinov3-vits16plus-pretrain-lvd1689m",
    ),
    "v3-B/16": ("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "dinov3-vitb16-pretrain-lvd1689m"),
    "v3-L/16": ("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "dinov3-vitl16-pretrain-lvd1689m"),
    "v3-H+/16": (
        "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
        "dinov3-vith16plus-pretrain-lvd1689m",
    ),
    "v3-7B/16": (
        "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth",
        "dinov3-vit7b16-pretrain-lvd1689m",
    ),
}
DINOV3_DOWNLOAD_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"

_DINOV2_URL = (
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14{reg}_pretrain.pth"
)
DINOV2_URLS: dict[str, str] = {
    f"{prefix}-{size.upper() if size != 'g' else 'g'}/14": _DINOV2_URL.format(
        s=size, reg="_reg4" if prefix == "v2reg" else ""
    )
    for prefix in ("v2", "v2reg")
    for size in ("s", "b", "l", "g")
}


def dinov3_weights_hint(variant: str) -> str:
    """Where to get the gated DINOv3 weights of a variant (for error messages)."""
    official, hf = DINOV3_FILES.get(variant, ("the DINOv3 .pth for this variant", "dinov3-..."))
    return (
        f"DINOv3 weights are gated and load from local files only: request access at "
        f"{DINOV3_DOWNLOAD_PAGE} and download {official}, or accept the licence of "
        f"https://huggingface.co/facebook/{hf} and download its model.safetensors; then pass "
        "--weights=FILE"
    )


# ----------------------------------------------------------------------------- HF names


def _merge_qkv(state, groups, out, what) -> None:
    """Stacks per-layer query/key/value tensors into the official fused ``qkv``."""
    for (layer, kind), parts in sorted(groups.items()):
        if kind == "bias" and "k" not in parts and {"q", "v"} <= set(parts):
            parts["k"] = np.zeros_like(parts["q"])  # DINOv3: the key bias is masked to 0
        missing = sorted({"q", "k", "v"} - set(parts))
        if missing:
            raise ValueError(f"{what} layer {layer} attention {kind}: missing {missing} parts")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0
        )


_HF_V2_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(\w+)$"
)
_HF_V2_GATE = re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(\w+)$")
_HF_V2_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.(norm[12])\.", r"blocks.\1.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
]


def is_hf_v2(state: dict[str, np.ndarray]) -> bool:
    """transformers Dinov2Model / Dinov2WithRegistersModel names (not v1 ViTModel ones)."""
    return any(re.match(r"^encoder\.layer\.\d+\.(norm1|layer_scale1)\.", k) for k in state)


def is_hf_v3(state: dict[str, np.ndarray]) -> bool:
    """transformers DINOv3ViTModel names (hub files: ``layer.N``; in memory: ``model.layer.N``)."""
    return "embeddings.patch_embeddings.weight" in state or any(
        re.match(r"^(model\.)?layer\.\d+\.layer_scale1\.", k) for k in state
    )


def rename_hf_v2(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers DINOv2 names (hub or in-memory) -> facebookresearch/dinov2 names."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    gates: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if m := _HF_V2_QKV.match(key):
            layer, long, short, kind = m.groups()
            qkv.setdefault((layer, kind), {})[short or long[0]] = value
            continue
        if m := _HF_V2_GATE.match(key):
            layer, part, kind = m.groups()
            gates.setdefault((layer, kind), {})[part] = value
            continue
        new = key
        for pattern, repl in _HF_V2_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    _merge_qkv(state, qkv, out, "DINOv2")
    for (layer, kind), parts in sorted(gates.items()):
        if set(parts) != {"gate", "up"}:
            raise ValueError(f"DINOv2 layer {layer} SwiGLU {kind}: needs gate_proj and up_proj")
        out[f"blocks.{layer}.mlp.w12.{kind}"] = np.concatenate([parts["gate"], parts["up"]], 0)
    return out


_HF_V3_QKV = re.compile(r"^layer\.(\d+)\.attention\.(q|k|v)_proj\.(\w+)$")
_HF_V3_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"),
    (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.(norm[12])\.", r"blocks.\1.\2."),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
]


def rename_hf_v3(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers DINOv3 ViT names (hub or in-memory) -> facebookresearch/dinov3 names."""
    state = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in state.items()}
    gated = any(re.match(r"^layer\.\d+\.mlp\.gate_proj\.", k) for k in state)
    mlp = {"gate": "w1", "up": "w2", "down": "w3"} if gated else {"up": "fc1", "down": "fc2"}
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if m := _HF_V3_QKV.match(key):
            layer, part, kind = m.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        if m := re.match(r"^layer\.(\d+)\.mlp\.(gate|up|down)_proj\.(\w+)$", key):
            layer, part, kind = m.groups()
            out[f"blocks.{layer}.mlp.{mlp[part]}.{kind}"] = value
            continue
        if key == "embeddings.mask_token":  # (1, 1, C) in transformers, (1, C) officially
            out["mask_token"] = value.reshape(1, -1)
            continue
        new = key
        for pattern, repl in _HF_V3_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    _merge_qkv(state, qkv, out, "DINOv3")
    return out


def unchunk_blocks(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DINOv2 training checkpoints with block chunks: ``blocks.C.N.x`` -> ``blocks.N.x``."""
    if not any(re.match(r"^blocks\.\d+\.\d+\.", k) for k in state):
        return state
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


# ----------------------------------------------------------------------------- checks


def detect(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """What an official-named state dict holds: family, patch, dim, depth, registers, swiglu,
    qkv_bias."""
    has_ls = any(re.match(r"^blocks\.\d+\.ls1\.gamma$", k) for k in state)
    if not has_ls:
        kind = "v1"
    elif "pos_embed" in state:
        kind = "v2"
    else:
        kind = "v3"
    info: dict[str, Any] = {"family": kind}
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        info["patch"], info["dim"] = int(w.shape[-1]), int(w.shape[0])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    info["depth"] = max(blocks) + 1 if blocks else 0
    tokens = state.get("register_tokens", state.get("storage_tokens"))
    info["registers"] = int(tokens.shape[1]) if tokens is not None and tokens.ndim == 3 else 0
    info["swiglu"] = any(re.match(r"^blocks\.\d+\.mlp\.w", k) for k in state)
    info["qkv_bias"] = any(re.match(r"^blocks\.\d+\.attn\.qkv\.bias$", k) for k in state)
    return info


def describe(info: dict[str, Any]) -> str:
    parts = [FAMILY_NAMES[info["family"]]]
    if "patch" in info:
        parts.append(f"patch {info['patch']}, dim {info['dim']}")
    parts.append(f"depth {info['depth']}, {info['registers']} register tokens")
    if info["swiglu"]:
        parts.append("SwiGLU")
    if not info.get("qkv_bias", True):
        parts.append("no qkv bias")
    return ", ".join(parts)


def _spec_info(variant: str) -> dict[str, Any]:
    spec = get_variant(variant)
    return {
        "family": spec.family, "patch": spec.patch, "dim": spec.dim, "depth": spec.depth,
        "registers": spec.registers, "swiglu": spec.swiglu, "qkv_bias": spec.qkv_bias,
    }  # fmt: skip


def guess_variant(info: dict[str, Any]) -> str | None:
    """The variant whose family and shape an official-named state dict matches, if any."""
    for name in VARIANTS:
        if _spec_info(name) == {k: info.get(k) for k in _spec_info(name)}:
            return name
    return None


def check_matches_variant(state: dict[str, np.ndarray], variant: str) -> None:
    """Raises ValueError naming both sides if the weights are of another family or shape."""
    want = _spec_info(variant)
    got = detect(state)
    if "patch" not in got:
        got_cmp = {k: v for k, v in got.items() if k in ("family", "registers", "swiglu")}
        want_cmp = {k: want[k] for k in got_cmp}
    else:
        got_cmp, want_cmp = got, want
    if got_cmp == want_cmp:
        return
    guess = guess_variant(got)
    if got["family"] == want["family"] == "v2" and got["registers"] != want["registers"]:
        what = "registers checkpoint" if got["registers"] else "checkpoint without registers"
        lead = f"a DINOv2 {what} ({got['registers']} register tokens)"
    else:
        lead = f"a {describe(got)} checkpoint"
    raise ValueError(
        f"weights do not match variant {variant!r} ({describe(want)}): they are {lead}"
        + (f", i.e. variant {guess!r}" if guess else "")
    )


def expected_shapes_v2v3(variant: str, num_positions: int = 0) -> dict[str, tuple[int, ...]]:
    """Official key -> PyTorch shape for a DINOv2 / DINOv3 variant (required keys only).

    ``num_positions`` (DINOv2) is the number of stored patch position embeddings.
    Optional DINOv3 entries (the buffers ``rope_embed.periods`` and
    ``blocks.N.attn.qkv.bias_mask``, the 7B's training-only ``local_cls_norm``) are checked by
    ``convert_state_dict_v2v3`` when present.
    """
    spec = get_variant(variant)
    if spec.family not in ("v2", "v3"):
        raise ValueError(f"{variant!r} is not a DINOv2/DINOv3 variant")
    c, p, h = spec.dim, spec.patch, mlp_hidden(variant)
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, c),
        "mask_token": (1, c),
        "patch_embed.proj.weight": (c, 3, p, p),
        "patch_embed.proj.bias": (c,),
        "norm.weight": (c,),
        "norm.bias": (c,),
    }
    if spec.family == "v2":
        shapes["pos_embed"] = (1, 1 + num_positions, c)
        if spec.registers:
            shapes["register_tokens"] = (1, spec.registers, c)
    else:
        shapes["storage_tokens"] = (1, spec.registers, c)
    if not spec.swiglu:
        mlp = {"mlp.fc1": (h, c), "mlp.fc2": (c, h)}
    elif spec.family == "v2":
        mlp = {"mlp.w12": (2 * h, c), "mlp.w3": (c, h)}
    else:
        mlp = {"mlp.w1": (h, c), "mlp.w2": (h, c), "mlp.w3": (c, h)}
    for i in range(spec.depth):
        b = f"blocks.{i}."
        for name, (out_dim, in_dim) in {
            "attn.qkv": (3 * c, c), "attn.proj": (c, c), **mlp
        }.items():  # fmt: skip
            shapes[f"{b}{name}.weight"] = (out_dim, in_dim)
            if name != "attn.qkv" or spec.qkv_bias:
                shapes[f"{b}{name}.bias"] = (out_dim,)
        for norm in ("norm1", "norm2"):
            shapes[f"{b}{norm}.weight"] = (c,)
            shapes[f"{b}{norm}.bias"] = (c,)
        shapes[f"{b}ls1.gamma"] = (c,)
        shapes[f"{b}ls2.gamma"] = (c,)
    return shapes


# The official 7B (untie_global_and_local_cls_norm) holds a LayerNorm for the CLS token of
# local crops that only training uses; transformers drops it too.
_TRAINING_ONLY_V3 = ("local_cls_norm.weight", "local_cls_norm.bias")


def _check_optional_v3(state: dict[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
    """Applies qkv bias masks, checks the RoPE periods and the training-only norm; returns the
    state without them."""
    from depthg_jax.models.vit import rope_periods

    spec = get_variant(variant)
    state = dict(state)
    periods = state.pop("rope_embed.periods", None)
    if periods is not None:
        expected = rope_periods(spec.dim // spec.heads)
        if periods.shape != expected.shape or not np.allclose(periods, expected, rtol=1e-5):
            raise ValueError(
                f"rope_embed.periods {np.asarray(periods).ravel()[:4]}... (shape "
                f"{periods.shape}) differ from the base-100 RoPE periods of variant {variant!r} "
                f"{expected[:4]}... (shape {expected.shape}): unsupported RoPE settings"
            )
    for key in [k for k in _TRAINING_ONLY_V3 if k in state]:
        value = state.pop(key)
        if value.shape != (spec.dim,):
            raise ValueError(f"{key}: expected shape {(spec.dim,)} for variant {variant!r}, "
                             f"got {value.shape}")  # fmt: skip
    for key in [k for k in state if k.endswith(".attn.qkv.bias_mask")]:
        mask = state.pop(key)
        bias_key = key.removesuffix("_mask")
        if bias_key not in state or state[bias_key].shape != mask.shape:
            raise ValueError(f"{key} (shape {mask.shape}) has no matching {bias_key}")
        if not np.all(np.isin(mask, (0.0, 1.0))):
            raise ValueError(f"{key} holds values other than 0 and 1 (uninitialised buffer?)")
        state[bias_key] = state[bias_key] * mask.astype(state[bias_key].dtype)
    return state


def check_keys_and_shapes_v2v3(state: dict[str, np.ndarray], variant: str) -> None:
    check_matches_variant(state, variant)
    n = state_dicts.num_positions(state)
    state_dicts.check_against_shapes(state, expected_shapes_v2v3(variant, n), variant)


_TOKENS = ("cls_token", "pos_embed", "mask_token", "register_tokens", "storage_tokens")


def convert_state_dict_v2v3(
    state_dict: dict[str, np.ndarray], variant: str, *, consume: bool = False
) -> dict[str, Any]:
    """Official-named DINOv2/DINOv3 state dict -> "params" of Dinov2ViT / Dinov3ViT(variant).

    Linear (out, in) -> Dense kernel (in, out); patch Conv2d (C, 3, p, p) -> Conv kernel
    (p, p, 3, C); LayerNorm weight -> scale; LayerScale gamma and tokens as they are; a
    DINOv3 qkv bias is multiplied by its bias_mask. Float32 numpy arrays throughout.
    consume: empty `state_dict` tensor by tensor as it converts (state_dicts.to_flax_params).
    """
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    if consume:
        state_dict.clear()  # `state` holds the only references now
    if get_variant(variant).family == "v3":
        state = _check_optional_v3(state, variant)
    check_keys_and_shapes_v2v3(state, variant)
    return state_dicts.to_flax_params(state, tokens=_TOKENS, consume=consume)
