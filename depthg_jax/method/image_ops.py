"""Image ops shared by the model, the losses and the data: pure array functions, NHWC.

PyTorch semantics where parity with the release matters (`grid_sample`, `F.interpolate`,
`adaptive_avg_pool2d`, `F.normalize`), each tested against torch in tests/image_ops_test.py
and tests/sampling_test.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PADDINGS = ("border", "zeros")
_HIGHEST = jax.lax.Precision.HIGHEST


def normalize_images(images):
    """uint8 (...,3) RGB -> float32 ImageNet-normalised (what the DINO backbone expects).

    Plain array arithmetic, so it serves NumPy batches on the host and traced jax arrays
    inside jitted steps alike (torchvision ToTensor + Normalize).
    """
    return (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def release_crf_image(images: np.ndarray) -> np.ndarray:
    """The CRF input image of the release: floor(255 * unnormalise(normalise(x))) as uint8.

    The float32 round trip lands a little below some integers, so ~15-25% of the levels come
    back one lower than the original uint8 (docs/release.md#crf-input-image).
    """
    x = normalize_images(np.asarray(images))
    unnormalised = x * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.floor(unnormalised * np.float32(255.0)), 0, 255).astype(np.uint8)


def l2_normalize(x, *, axis: int = -1, eps: float):
    """`F.normalize(x, dim=axis, eps=eps)`: x / max(||x||_2 over `axis`, eps).

    NumPy in, NumPy out (host KNN features); jax in, jax out (traced code).
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    norm = xp.sqrt(xp.sum(xp.square(x), axis=axis, keepdims=True))
    return x / xp.maximum(norm, eps)


def _check_rank(name: str, x, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {tuple(x.shape)}")


def _unnormalize(coord: jax.Array, size: int, align_corners: bool) -> jax.Array:
    """[-1, 1] -> pixel index space, as PyTorch's grid_sampler_unnormalize."""
    if align_corners:
        return ((coord + 1) / 2) * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _grid_sample_one(x: jax.Array, grid: jax.Array, align_corners: bool, padding: str):
    """One image: x (H, W, C), grid (Ho, Wo, 2) -> (Ho, Wo, C)."""
    h, w, _ = x.shape
    ix = _unnormalize(grid[..., 0], w, align_corners)
    iy = _unnormalize(grid[..., 1], h, align_corners)
    if padding == "border":
        # PyTorch clips the unnormalised coordinate to the valid pixel range.
        ix = jnp.clip(ix, 0, w - 1)
        iy = jnp.clip(iy, 0, h - 1)
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    x1 = x0 + 1
    y1 = y0 + 1
    corners = (
        (x0, y0, (x1 - ix) * (y1 - iy)),
        (x1, y0, (ix - x0) * (y1 - iy)),
        (x0, y1, (x1 - ix) * (iy - y0)),
        (x1, y1, (ix - x0) * (iy - y0)),
    )
    out = jnp.zeros(grid.shape[:-1] + x.shape[-1:], x.dtype)
    for cx, cy, weight in corners:
        inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        # Out-of-range corners read a clamped pixel with weight 0 (zeros padding).
        weight = jnp.where(inside, weight, 0)
        xi = jnp.clip(cx, 0, w - 1).astype(jnp.int32)
        yi = jnp.clip(cy, 0, h - 1).astype(jnp.int32)
        out = out + x[yi, xi] * weight[..., None]
    return out


def grid_sample(
    x: jax.Array, grid: jax.Array, align_corners: bool, padding: str = "border"
) -> jax.Array:
    """Bilinear `torch.nn.functional.grid_sample` in NHWC.

    Args:
      x: (B, H, W, C) values.
      grid: (B, Ho, Wo, 2) coordinates, last axis (x=column, y=row) in [-1, 1].
      align_corners: True: -1/+1 are the centres of the first/last pixel; False: their
        outer edges.
      padding: "border" (clamp to the edge pixel) or "zeros".

    Returns:
      (B, Ho, Wo, C).
    """
    _check_rank("x", x, 4, "(B, H, W, C)")
    _check_rank("grid", grid, 4, "(B, Ho, Wo, 2)")
    if grid.shape[0] != x.shape[0] or grid.shape[-1] != 2:
        raise ValueError(
            f"grid must be (B={x.shape[0]}, Ho, Wo, 2) for x {tuple(x.shape)}, "
            f"got {tuple(grid.shape)}"
        )
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    fn = lambda xi, gi: _grid_sample_one(xi, gi, align_corners, padding)
    # Positions and weights in at least float32 (bf16 coordinates would move the samples).
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, grid.dtype), jnp.float32)
    return jax.vmap(fn)(x.astype(dtype), grid.astype(dtype)).astype(x.dtype)


def _interp_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out, in) bilinear weights of F.interpolate along one axis (host constant)."""
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        # PyTorch: scale = in/out, source index clamped at 0.
        src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    src = src.astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), 1 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def resize_bilinear(x: jax.Array, size: int | Sequence[int], align_corners: bool) -> jax.Array:
    """`F.interpolate(mode="bilinear")` in NHWC: x (B, H, W, C) -> (B, Ho, Wo, C)."""
    _check_rank("x", x, 4, "(B, H, W, C)")
    ho, wo = _pair(size)
    mh = jnp.asarray(_interp_matrix(x.shape[1], ho, align_corners), x.dtype)
    mw = jnp.asarray(_interp_matrix(x.shape[2], wo, align_corners), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", mh, mw, x, precision=_HIGHEST)


def _pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging weights of adaptive_avg_pool along one axis."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def average_pool(depth: jax.Array, out_hw: int | Sequence[int]) -> jax.Array:
    """`F.adaptive_avg_pool2d`: depth (B, H, W) -> (B, h, w), any (also non-divisible) sizes."""
    _check_rank("depth", depth, 3, "(B, H, W)")
    ho, wo = _pair(out_hw)
    if ho > depth.shape[1] or wo > depth.shape[2] or ho < 1 or wo < 1:
        raise ValueError(f"cannot pool depth {tuple(depth.shape)} to {(ho, wo)}")
    if not jnp.issubdtype(depth.dtype, jnp.floating):
        depth = depth.astype(jnp.float32)  # 8-bit depth maps average as floats
    mh = jnp.asarray(_pool_matrix(depth.shape[1], ho), depth.dtype)
    mw = jnp.asarray(_pool_matrix(depth.shape[2], wo), depth.dtype)
    return jnp.einsum("oh,pw,bhw->bop", mh, mw, depth, precision=_HIGHEST)
