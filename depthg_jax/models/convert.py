"""Pretrained DINO / DINOv2 / DINOv3 weights (official .pth, timm, Hugging Face) -> params.

Usage:
  python -m depthg_jax.models.convert --variant=S/8 --weights=FILE --out=DIR

writes an Orbax checkpoint of the backbone params to DIR/params plus DIR/backbone.json
(the variant). Without --weights it downloads the official DINO or DINOv2 file for the
variant; DINOv3 weights are gated and load from local files only.
Nothing is written unless everything succeeds (we build in a temp dir and rename).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from depthg_jax import commands
from depthg_jax.models import convert_v2v3, state_dicts
from depthg_jax.models.pth import load_pth
from depthg_jax.models.variants import VARIANTS, get_variant
from depthg_jax.runtime import files

OFFICIAL_URLS: dict[str, str] = {
    "S/16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "S/8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
    "B/16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "B/8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    **convert_v2v3.DINOV2_URLS,
}
META_FILE = "backbone.json"
PARAMS_DIR = "params"
# Nesting keys of full training checkpoints, in order of preference (DINO's teacher is
# the network the released backbones come from).
NESTING_KEYS = ("teacher", "state_dict", "model", "student")
# Non-backbone parts that checkpoints may carry: DINO projection head, classifier, HF pooler.
_DROPPED = re.compile(r"^(head\.|pooler\.|fc_norm\.|classifier\.)")

_HF_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)$")


# ----------------------------------------------------------------------------- reading


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: corrupt or unreadable safetensors file: {e}") from e
    if magic[:2] == b"PK" or path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return load_pth(path)
    raise ValueError(
        f"{path}: unrecognised weight format (expected a torch .pth/.bin zip or .safetensors)"
    )


def _unnest(obj: Any, path: Path) -> dict[str, Any]:
    """Descends into teacher/state_dict/model/student until a flat name->array dict."""
    while isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        key = next((k for k in NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ValueError(
                f"{path}: no tensors found; top-level keys {sorted(map(str, obj))} contain none "
                f"of {NESTING_KEYS}"
            )
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes DDP's ``module.``, DINO's ``backbone.`` and HF's ``vit.``/``dino.``/``dinov2.``
    wrappers."""
    subnets = ("backbone.", "vit.", "dino.", "dinov2.", "dinov2_with_registers.")
    for prefix in ("module.", *subnets):
        if state and any(k.startswith(prefix) for k in state):
            # A wrapped checkpoint also holds siblings of the backbone (e.g. "head."): keep
            # only the wrapped part when the prefix is a sub-network name.
            if prefix in subnets:
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            else:
                state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _rename_hf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers ViT names -> DINO names; query/key/value are concatenated into qkv."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _HF_QKV.match(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        new = key
        for pattern, repl in _HF_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    for (layer, kind), parts in qkv.items():
        missing = {"query", "key", "value"} - set(parts)
        if missing:
            raise ValueError(f"layer {layer} attention {kind}: missing {sorted(missing)}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0
        )
    return out


def normalise_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps a flat state dict of any supported naming to official DINO / DINOv2 / DINOv3 names."""
    state = _strip_prefixes(state)
    if convert_v2v3.is_hf_v3(state):
        state = convert_v2v3.rename_hf_v3(state)
    elif convert_v2v3.is_hf_v2(state):
        state = convert_v2v3.rename_hf_v2(state)
    elif any(k.startswith(("embeddings.", "encoder.")) for k in state):
        state = _rename_hf(state)
    state = convert_v2v3.unchunk_blocks(state)
    return {k: v for k, v in state.items() if not _DROPPED.match(k)}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a DINO/DINOv2/DINOv3/timm/HF weight file into {official name: numpy array}.

    Accepts official DINO, DINOv2 and DINOv3 .pth (plain, or nested under
    teacher/student/model/state_dict, with module./backbone. prefixes), timm state dicts
    (.pth/.bin/.safetensors) and Hugging Face safetensors (facebook/dino-vits8,
    facebook/dinov2-small, facebook/dinov2-with-registers-small,
    facebook/dinov3-vits16-pretrain-lvd1689m names). .pth files are read without torch by
    a restricted unpickler that refuses any non-tensor global.
    """
    path = Path(path)
    raw = _read_file(path)
    return normalise_state_dict(_unnest(raw, path))


# ----------------------------------------------------------------------------- conversion


def infer_architecture(state: dict[str, np.ndarray]) -> dict[str, int]:
    """Reads patch, dim and depth off a DINO-named state dict (for error messages)."""
    arch = {}
    if "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].ndim == 4:
        arch["patch"] = int(state["patch_embed.proj.weight"].shape[-1])
    if "cls_token" in state:
        arch["dim"] = int(state["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    arch["depth"] = max(blocks) + 1 if blocks else 0
    return arch


def _guess_variant(arch: dict[str, int]) -> str | None:
    for name, spec in VARIANTS.items():
        if (spec.patch, spec.dim, spec.depth) == (
            arch.get("patch"),
            arch.get("dim"),
            arch.get("depth"),
        ):
            return name
    return None


def expected_shapes(variant: str, num_positions: int) -> dict[str, tuple[int, ...]]:
    """Official key -> PyTorch shape for a variant with num_positions patch positions."""
    spec = get_variant(variant)
    if spec.family != "v1":
        return convert_v2v3.expected_shapes_v2v3(variant, num_positions)
    c, p, hidden = spec.dim, spec.patch, spec.dim * 4
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, c),
        "pos_embed": (1, 1 + num_positions, c),
        "patch_embed.proj.weight": (c, 3, p, p),
        "patch_embed.proj.bias": (c,),
        "norm.weight": (c,),
        "norm.bias": (c,),
    }
    for i in range(spec.depth):
        b = f"blocks.{i}."
        for name, (out_dim, in_dim) in {
            "attn.qkv": (3 * c, c),
            "attn.proj": (c, c),
            "mlp.fc1": (hidden, c),
            "mlp.fc2": (c, hidden),
        }.items():
            shapes[f"{b}{name}.weight"] = (out_dim, in_dim)
            shapes[f"{b}{name}.bias"] = (out_dim,)
        for norm in ("norm1", "norm2"):
            shapes[f"{b}{norm}.weight"] = (c,)
            shapes[f"{b}{norm}.bias"] = (c,)
    return shapes


def _check_keys_and_shapes(state: dict[str, np.ndarray], variant: str) -> None:
    spec = get_variant(variant)
    convert_v2v3.check_matches_variant(state, variant)  # e.g. a DINOv2 file for a v1 variant
    arch = infer_architecture(state)
    if (arch.get("patch"), arch.get("dim"), arch.get("depth")) != (
        spec.patch,
        spec.dim,
        spec.depth,
    ) and {"patch", "dim"} <= set(arch):
        guess = _guess_variant(arch)
        raise ValueError(
            f"weights do not match variant {variant!r} (patch {spec.patch}, dim {spec.dim}, "
            f"depth {spec.depth}): they hold patch {arch['patch']}, dim {arch['dim']}, depth "
            f"{arch['depth']}" + (f", i.e. variant {guess!r}" if guess else "")
        )
    n = state_dicts.num_positions(state)
    state_dicts.check_against_shapes(state, expected_shapes(variant, n), variant)


def convert_state_dict(
    state_dict: dict[str, np.ndarray], variant: str, *, consume: bool = False
) -> dict[str, Any]:
    """Official-named state dict -> the "params" of ``vit.build_backbone(variant)``.

    consume: convert tensor by tensor, taking each out of `state_dict` (left empty) as it is
    converted: the weights are never held twice (what the command and `load_backbone` do).

    Weights are float32 numpy arrays: Linear (out, in) becomes a Dense kernel (in, out),
    the patch Conv2d (C, 3, p, p) a Conv kernel (p, p, 3, C), LayerNorm weight its scale.
    DINOv2/DINOv3 variants go through ``convert_v2v3.convert_state_dict_v2v3``.
    Raises ValueError naming unknown/missing keys, a key whose shape is wrong (with both
    shapes), or a variant the weights do not fit (another family, size or register count).
    """
    check_finite_weights(state_dict, "the weights")
    if get_variant(variant).family != "v1":
        return convert_v2v3.convert_state_dict_v2v3(state_dict, variant, consume=consume)
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    if consume:
        state_dict.clear()  # `state` holds the only references now
    _check_keys_and_shapes(state, variant)
    return state_dicts.to_flax_params(state, tokens=("cls_token", "pos_embed"), consume=consume)


def check_finite_weights(named: dict[str, Any], source: str) -> None:
    """Raises ValueError naming every tensor of `source` that holds NaN or inf values."""
    bad = []
    for key, value in named.items():
        if isinstance(value, dict):
            try:
                check_finite_weights({f"{key}.{k}": v for k, v in value.items()}, source)
            except ValueError as e:
                bad.append(str(e).split(": ", 1)[1])
            continue
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad.append(f"{key} ({int(np.sum(~np.isfinite(value)))} of {value.size} non-finite)")
    if bad:
        raise ValueError(f"{source} hold NaN/inf values: {', '.join(bad)}")


# ----------------------------------------------------------------------------- checkpoints


# Storage pieces per parameter: each converted tensor is written in chunks that split every
# axis into up to this many pieces in all (balanced, XLA's shard boundaries included for a
# 'model' axis of up to 8), so a host restoring its shards reads only the chunks they cover.
STORAGE_PIECES = 64
# No chunk smaller than this (small tensors stay one chunk: reading them whole costs little).
MIN_CHUNK_BYTES = 4096


def _chunk_bytes(x) -> int:
    nbytes = int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return max(nbytes // STORAGE_PIECES, MIN_CHUNK_BYTES)


def save_backbone(
    params: dict[str, Any], variant: str, out: str | os.PathLike, source: str
) -> None:
    """Writes params as an Orbax checkpoint plus backbone.json; atomic (temp dir + rename).

    Each tensor is stored in chunks (`STORAGE_PIECES`), so that `load_backbone` with sharded
    targets reads, on each host, only the chunks of the shards that host's devices hold.
    """
    import jax
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"output {out} already exists; choose a new --out directory")
    save_args = jax.tree.map(lambda x: ocp.SaveArgs(chunk_byte_size=_chunk_bytes(x)), params)
    with files.atomic_directory(out, prefix=f".{out.name}.") as tmp:
        with _quiet_chunk_warning():
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(Path(tmp) / PARAMS_DIR, params, save_args=save_args)
                ckptr.wait_until_finished()
        meta = {"variant": variant, "source": source}
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


class _quiet_chunk_warning:
    """Orbax warns of chunks under 1 MiB; ours are small only for small tensors."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("absl")
        self._filter = lambda record: "target_byte_size too small" not in record.getMessage()
        self._logger.addFilter(self._filter)

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)


def is_converted(path: Path) -> bool:
    """True for a directory written by `save_backbone` (holds backbone.json)."""
    return path.is_dir() and (path / META_FILE).is_file()


def _restore_orbax(path: Path, variant: str, target=None) -> dict[str, Any]:
    """The params of a converted backbone; `target(shapes)` -> ShapeDtypeStructs with
    shardings (and dtype) restores straight into them, each host reading its shards only."""
    import orbax.checkpoint as ocp

    meta = json.loads((path / META_FILE).read_text())
    if meta.get("variant") != variant:
        raise ValueError(
            f"{path} holds a {meta.get('variant')!r} backbone, but variant {variant!r} was asked"
        )
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path / PARAMS_DIR)
        shapes = ckptr.metadata(path / PARAMS_DIR).item_metadata.tree
        return ckptr.restore(path / PARAMS_DIR, target(shapes))


def load_backbone(path: str | os.PathLike, variant: str, target=None) -> dict[str, Any]:
    """Backbone params for a variant from a converted Orbax dir or any supported weight file.

    target: for a converted dir, a function of the stored shapes returning the tree of
    ShapeDtypeStructs to restore into (models/partitioning.py: sharded on the mesh, in the
    configured dtype); the finiteness check then runs on the devices. Weight files ignore it
    (they load on the host; the caller places them).
    """
    get_variant(variant)
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise ValueError(f"{path} is a directory without {META_FILE}: not a converted backbone")
        params = _restore_orbax(path, variant, target)
        if target is None:
            check_finite_weights(params, f"the converted weights {path}")
        else:
            check_finite_on_devices(params, f"the converted weights {path}")
        return params
    try:
        return convert_state_dict(load_state_dict(path), variant, consume=True)
    except ValueError as e:
        if "NaN/inf" in str(e):
            raise ValueError(f"{path}: {e}") from e
        raise


def check_finite_on_devices(params: dict[str, Any], source: str) -> None:
    """check_finite_weights for device (possibly sharded, multi-host) arrays: one reduction per
    tensor on the devices, and only the verdicts come back."""
    import jax
    import jax.numpy as jnp

    from depthg_jax.runtime import sharding

    counts = jax.jit(lambda t: jax.tree.map(lambda x: jnp.sum(~jnp.isfinite(x)), t))(params)
    counts = sharding.host_copy(counts)
    flat = jax.tree_util.tree_flatten_with_path(counts)[0]
    sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, params))
    bad = [
        f"{'.'.join(str(getattr(k, 'key', k)) for k in path)} ({int(n)} of {size} non-finite)"
        for (path, n), size in zip(flat, sizes, strict=True)
        if int(n)
    ]
    if bad:
        raise ValueError(f"{source} hold NaN/inf values: {', '.join(bad)}")


def download_official(variant: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Downloads the official DINO/DINOv2 weights for a variant (cached); clear error offline."""
    if get_variant(variant).family == "v3":
        raise ValueError(convert_v2v3.dinov3_weights_hint(variant))
    if variant not in OFFICIAL_URLS:
        raise ValueError(
            f"no official DINO weights for variant {variant!r} (available: "
            f"{sorted(OFFICIAL_URLS)}); pass --weights=FILE"
        )
    url = OFFICIAL_URLS[variant]
    cache = Path(cache_dir or Path.home() / ".cache" / "depthg_jax")
    target = cache / url.rsplit("/", 1)[1]
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({e}). Without network, fetch that file elsewhere and "
            f"pass it with --weights=FILE (a DINO/DINOv2 .pth, timm .pth/.safetensors or HF "
            "safetensors file)"
        ) from e
    os.replace(part, target)
    return target


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("variant", None, f"One of {sorted(VARIANTS)}.", flag_values=fv)
    flags.DEFINE_string(
        "weights", None, "Weight file (default: download the official one).", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Output directory (must not exist).", flag_values=fv)
    flags.mark_flags_as_required(["variant", "out"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    """Converts as the flags say; returns 0, or 1 with an error message on bad input."""
    try:
        get_variant(fv.variant)
        if Path(fv.out).exists():
            raise FileExistsError(f"output {fv.out} already exists; choose a new --out")
        weights = Path(fv.weights) if fv.weights else download_official(fv.variant)
        params = convert_state_dict(load_state_dict(weights), fv.variant, consume=True)
        save_backbone(params, fv.variant, fv.out, source=str(weights))
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(int(np.prod(v.shape)) for v in _leaves(params))
    print(f"wrote {fv.variant} backbone ({n} parameters) from {weights} to {fv.out}")
    return 0


def main(argv: list[str]) -> int:
    """Parses argv (without the program name) with this command's own flags and runs it."""
    return commands.run_with_own_flags(
        "python -m depthg_jax.models.convert", define_flags, run, argv, usage_status=1
    )


def _leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
