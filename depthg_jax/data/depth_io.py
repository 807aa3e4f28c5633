"""Depth-map files: discovery of input images, output naming, conversion and atomic writes.

Pure NumPy / Pillow; no torch or transformers here, so the dataset code can import it.
The command that fills these files with model predictions is `depthg_jax.data.depth`.

File formats (one file per input image `<rel>/<id>.<ext>`, same size as the image):
  png8   `<rel>/<id>_zoedepth.png`     uint8, per-image min-max, floor(x·255), 0 = nearest.
  png16  `<rel>/<id>_zoedepth_16.png`  uint16, per-image min-max, floor(x·65535), 0 = nearest.
  npy    `<rel>/<id>_depth.npy`        float32, not normalised, larger = farther.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from depthg_jax.data.images import DEPTH_SUFFIXES
from depthg_jax.runtime.files import write_atomic

NearestIs = Literal["small", "large"]
FORMATS = tuple(DEPTH_SUFFIXES)


def map_output_path(rel: str | os.PathLike, fmt: str = "png8") -> Path:
    """Maps an input image path relative to --images to its depth file relative to --out.

    `train/a/x.jpg` → `train/a/x_zoedepth.png` (png8), `x_zoedepth_16.png` (png16), `x_depth.npy`.
    """
    if fmt not in DEPTH_SUFFIXES:
        raise ValueError(f"unknown depth format {fmt!r}; expected one of {FORMATS}")
    rel = Path(rel)
    return rel.parent / (rel.stem + DEPTH_SUFFIXES[fmt])


def find_output_collisions(rels: Iterable[Path], fmt: str) -> dict[Path, list[Path]]:
    """Returns output paths claimed by more than one input (e.g. `x.jpg` and `x.png`)."""
    claims: dict[Path, list[Path]] = {}
    for rel in rels:
        claims.setdefault(map_output_path(rel, fmt), []).append(rel)
    return {out: ins for out, ins in claims.items() if len(ins) > 1}


def is_within(path: Path, parent: Path) -> bool:
    """Whether `path` is `parent` or lies below it, after resolving symlinks."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(parent))


def normalize_depth(depth: np.ndarray, nearest_is: NearestIs = "small") -> np.ndarray:
    """Per-image min-max normalisation to [0, 1] with 0 = nearest, as float64 (H, W).

    `nearest_is` says which end of the model's output is near: "small" for depth (ZoeDepth,
    metric models), "large" for inverse depth / disparity (Depth Anything relative, MiDaS/DPT).
    A constant map becomes all zeros.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D (H, W) map, got shape {depth.shape}")
    if nearest_is not in ("small", "large"):
        raise ValueError(f"nearest_is must be 'small' or 'large', got {nearest_is!r}")
    if not np.all(np.isfinite(depth)):
        raise ValueError(f"depth map has {int(np.sum(~np.isfinite(depth)))} non-finite values")
    lo, hi = depth.min(), depth.max()
    if hi <= lo:
        return np.zeros_like(depth)
    unit = (depth - lo) / (hi - lo)
    return 1.0 - unit if nearest_is == "large" else unit


def depth_to_png8(depth: np.ndarray, nearest_is: NearestIs = "small") -> np.ndarray:
    """Depth (H, W) → uint8 (H, W): min-max normalised, 0 = nearest, floor(x·255) as DepthG's own
    generator wrote them (so only the farthest pixel is 255)."""
    return np.floor(normalize_depth(depth, nearest_is) * 255.0).astype(np.uint8)


def depth_to_png16(depth: np.ndarray, nearest_is: NearestIs = "small") -> np.ndarray:
    """Depth (H, W) → uint16 (H, W): min-max normalised, 0 = nearest, floor(x·65535)."""
    return np.floor(normalize_depth(depth, nearest_is) * 65535.0).astype(np.uint16)


def depth_to_far_positive(depth: np.ndarray, nearest_is: NearestIs = "small") -> np.ndarray:
    """Depth (H, W) → float32 (H, W) oriented so larger = farther, otherwise unnormalised.

    Depth models ("small" = near) keep their values (metres for metric models). Inverse-depth
    models ("large" = near) are flipped as max(d) − d: the nearest point becomes 0 and the
    ordering is right, but the values are not metric (relative disparity has no true scale).
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D (H, W) map, got shape {depth.shape}")
    if nearest_is == "small":
        return depth
    if nearest_is == "large":
        return (depth.max() - depth).astype(np.float32)
    raise ValueError(f"nearest_is must be 'small' or 'large', got {nearest_is!r}")


def encode_depth(depth: np.ndarray, fmt: str, nearest_is: NearestIs) -> np.ndarray:
    """The array that `fmt` stores for a raw model prediction `depth` (H, W)."""
    if fmt == "png8":
        return depth_to_png8(depth, nearest_is)
    if fmt == "png16":
        return depth_to_png16(depth, nearest_is)
    if fmt == "npy":
        return depth_to_far_positive(depth, nearest_is)
    raise ValueError(f"unknown depth format {fmt!r}; expected one of {FORMATS}")


def save_depth(path: str | os.PathLike, encoded: np.ndarray) -> None:
    """Atomically writes an array from `encode_depth`: uint8/uint16 as PNG, float32 as .npy."""
    if encoded.dtype == np.float32:
        write_atomic(path, lambda f: np.save(f, encoded, allow_pickle=False))
    elif encoded.dtype in (np.uint8, np.uint16):
        write_atomic(path, lambda f: Image.fromarray(encoded).save(f, format="PNG"))
    else:
        raise ValueError(f"cannot save depth of dtype {encoded.dtype} to {path}")
