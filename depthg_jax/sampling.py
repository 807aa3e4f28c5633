"""Where the losses look: grid sampling, depth lifting, farthest point sampling, coordinates.

Pure JAX, NHWC. Every function takes arrays and Python scalars; randomness comes in as
keys. Semantics follow PyTorch (`grid_sample`, `F.interpolate`, `adaptive_avg_pool2d`) and
the released DepthG code (SPEC.md §4 and §6) so the two can be compared term by term.

Coordinates are (x, y) = (column, row) in [-1, 1], as in `torch.nn.functional.grid_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("reference", "corrected")
PADDINGS = ("border", "zeros")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {tuple(x.shape)}")


def _check_coords(name: str, coords: jax.Array, batch: int) -> None:
    _check_rank(name, coords, 4, "(B, S, S, 2)")
    if coords.shape[0] != batch or coords.shape[1] != coords.shape[2] or coords.shape[3] != 2:
        raise ValueError(f"{name} must be (B={batch}, S, S, 2), got shape {tuple(coords.shape)}")


# --------------------------------------------------------------------------------------
# Grid sampling and resizing (PyTorch semantics)
# --------------------------------------------------------------------------------------


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


def sample(x: jax.Array, coords: jax.Array) -> jax.Array:
    """The released `sample`: values of x at coords, bilinear, border, align_corners True.

    The release transposes the grid's two spatial axes before sampling, so
    out[b, i, j] reads x at coords[b, j, i]. Kept exactly; `depth_fps_coords` accounts for it.

    Args:
      x: (B, H, W, C).
      coords: (B, S, S, 2), (x=column, y=row) in [-1, 1].

    Returns:
      (B, S, S, C).
    """
    _check_rank("x", x, 4, "(B, H, W, C)")
    _check_coords("coords", coords, x.shape[0])
    return grid_sample(x, jnp.swapaxes(coords, 1, 2), align_corners=True, padding="border")


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


# --------------------------------------------------------------------------------------
# Depth lifting and farthest point sampling (SPEC §6)
# --------------------------------------------------------------------------------------


def lift_scale(fov: float, mode: str) -> float:
    """2·tan(fov/2): fov taken as radians in "reference" (as released), degrees in "corrected"."""
    _check_mode(mode)
    angle = fov if mode == "reference" else math.radians(fov)
    return 2.0 * math.tan(angle / 2.0)


def lift_points(
    depth: jax.Array,
    row: jax.Array,
    col: jax.Array,
    height: int,
    width: int,
    scale: float,
    far: float,
) -> jax.Array:
    """Pinhole lift of depth at (row, col) of an height x width grid -> (..., 3) (X, Y, Z)."""
    # Same operation order as the release (factor * d * (i - n/2) / n) for float parity.
    x = scale * depth * (col - width / 2.0) / width
    y = scale * depth * (row - height / 2.0) / height
    return jnp.stack([x, y, -depth * far], axis=-1)


def lift_depth(
    depth: jax.Array, fov: float = 90.0, far: float = 5.0, mode: str = "reference"
) -> jax.Array:
    """Lift a depth map (H, W) to points (H*W, 3), row-major (SPEC §6).

    X = 2tan(fov/2)·d·(col − W/2)/W, Y = 2tan(fov/2)·d·(row − H/2)/H, Z = −far·d.
    "reference" passes fov to tan as radians (the released behaviour); "corrected" as degrees.
    """
    _check_rank("depth", depth, 2, "(H, W)")
    h, w = depth.shape
    row, col = jnp.meshgrid(
        jnp.arange(h, dtype=depth.dtype), jnp.arange(w, dtype=depth.dtype), indexing="ij"
    )
    points = lift_points(depth, row, col, h, w, lift_scale(fov, mode), far)
    return points.reshape(h * w, 3)


def farthest_point_sample(points: jax.Array, num_samples: int, start: int = 0) -> jax.Array:
    """Farthest point sampling: indices (num_samples,) int32 of points (N, D).

    Starts at `start`; keeps each point's squared distance to the nearest selected point and
    repeatedly takes the unselected point with the largest one, first index on ties (the
    released `fps`). Jittable and vmappable (`start` may be traced); for many clouds at once
    use `farthest_point_sample_batch` (~2.5x faster than a vmap of this when compiled with
    `depthg_jax.xla.jit` on CPU).
    """
    _check_rank("points", points, 2, "(N, D)")
    start = jnp.asarray(start, jnp.int32)[None]
    return farthest_point_sample_batch(points[None], num_samples, start)[0]


def farthest_point_sample_batch(
    points: jax.Array, num_samples: int, start: int | jax.Array = 0
) -> jax.Array:
    """`farthest_point_sample` of each cloud of points (B, N, D): indices (B, num_samples).

    `start` is one index for all clouds or one per cloud (B,). One `lax.fori_loop` over the
    samples, all clouds in each iteration.
    """
    _check_rank("points", points, 3, "(B, N, D)")
    b, n, dims = points.shape
    if not 1 <= num_samples <= n:
        raise ValueError(
            f"num_samples must be in [1, N={n}] for points {tuple(points.shape)}, got {num_samples}"
        )
    # At least float32: the selection marks and negated indices below are exact integers
    # in it only up to 2**24.
    points = points.astype(jnp.promote_types(points.dtype, jnp.float32))
    if points.dtype == jnp.float32 and n > 2**24:
        raise ValueError(f"float32 FPS supports at most 2**24 points, got N={n}")
    # Coordinate-major, cloud-minor (D, N, B): each reduction over points is an elementwise
    # max across rows of B lanes, which XLA:CPU vectorises (~2.5x faster than rows of N
    # points under our compiler options). Summing the squared differences left to right
    # matches NumPy's ((dx² + dy²) + dz²) for parity of near-ties.
    coords = jnp.transpose(points, (2, 1, 0))
    iota = jnp.arange(n, dtype=jnp.int32)[:, None]
    neg_iota = -iota.astype(points.dtype)
    lanes = jnp.arange(b)
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))

    # 120 dependent iterations at 28x28, each a few microseconds of launch overhead plus one
    # pass over B x N values, so the body is a handful of XLA kernels: one
    # gather of the last points, one fused update of the running distances, two reductions.
    # The selection order is kept in the same array: the point chosen at iteration k holds
    # -(k + 1), below any distance (so it never wins again), instead of a per-iteration
    # scatter into an index array.
    def step(i, state):
        min_dist, last = state  # (N, B), (B,)
        last_point = coords[:, last, lanes]  # (D, B)
        dist = (coords[0] - last_point[0]) ** 2
        for d in range(1, dims):
            dist = dist + (coords[d] - last_point[d]) ** 2
        # fmin ignores NaN (non-finite depth), so a negative mark is never lost.
        mark = -i.astype(points.dtype)  # `last` was chosen at iteration i - 1
        min_dist = jnp.where(iota == last, mark, jnp.fmin(min_dist, dist))
        # argmax with the first index on ties, as two plain float max-reductions: XLA:CPU
        # runs a variadic argmax reduce several times slower, and an int32 min-reduce of the
        # tied indices ~1.5x slower than the max of their negated float indices.
        top = jnp.max(min_dist, axis=0)
        tied = jnp.where(min_dist == top, neg_iota, -jnp.inf)
        chosen = (-jnp.max(tied, axis=0)).astype(jnp.int32)
        return min_dist, chosen

    init = (jnp.full((n, b), jnp.inf, points.dtype), start)
    min_dist, last = jax.lax.fori_loop(1, num_samples, step, init)
    # Iteration positions of the marked points (unmarked: n, dropped), then the final pick.
    position = jnp.where(min_dist < 0, -min_dist - 1, n).astype(jnp.int32)
    point_index = jnp.broadcast_to(iota, (n, b))
    indices = jnp.zeros((b, num_samples), jnp.int32)
    indices = indices.at[lanes[None, :], position].set(point_index, mode="drop")
    return indices.at[:, num_samples - 1].set(last)


def _coords_from_indices(idx: jax.Array, h: int, w: int, num_side: int, mode: str, dtype):
    """FPS indices (S²,) of an (h, w) grid -> sample coords (S, S, 2), SPEC §6."""
    if mode == "reference":
        # Released: mark the selected cells, read them back in row-major order (FPS order
        # lost), (row/h, col/w)·2−1 used as (x, y): axes swapped, shrunk by (n−1)/n.
        idx = jnp.sort(idx)
    row = (idx // w).astype(dtype)
    col = (idx % w).astype(dtype)
    if mode == "reference":
        coords = jnp.stack([row / h, col / w], axis=-1) * 2 - 1
        return coords.reshape(num_side, num_side, 2)
    # Corrected: exact cell centres under align_corners=True, FPS order row-major in the
    # sampled output. `sample` reads out[i, j] at coords[j, i], so store the transpose.
    x = 2 * col / max(w - 1, 1) - 1
    y = 2 * row / max(h - 1, 1) - 1
    coords = jnp.stack([x, y], axis=-1).reshape(num_side, num_side, 2)
    return jnp.swapaxes(coords, 0, 1)


def depth_fps_coords(
    depth: jax.Array,
    feature_hw: int | Sequence[int],
    num_side: int,
    mode: str = "reference",
    *,
    fov: float = 90.0,
    far: float = 5.0,
) -> jax.Array:
    """Depth-guided sample coordinates (B, S, S, 2) by farthest point sampling (SPEC §6).

    Depth (B, H, W) is average-pooled to the feature grid `feature_hw`, lifted to 3D and
    S² = num_side² points are chosen by FPS from cell 0, per image (all images in one loop).

    "reference": the released `farthest_point_sampling_depth(t, depth, S) * 2 - 1` for a
    feature map t of spatial size feature_hw (row-major order, rows/columns swapped and
    shrunk by (n−1)/n). "corrected": `sample(feature_map, coords)[b, i, j]` is exactly the
    feature at FPS point i·S + j.

    Non-finite depth is not checked here (it cannot be, under jit): the coordinates stay
    finite and in [-1, 1] but the choice of points is meaningless. Use `check_depth` on the
    host to reject such maps.
    """
    _check_mode(mode)
    _check_rank("depth", depth, 3, "(B, H, W)")
    h, w = _pair(feature_hw)
    if num_side < 1 or num_side * num_side > h * w:
        raise ValueError(
            f"num_side**2 = {num_side * num_side} must be in [1, {h * w}] points of the "
            f"feature grid {(h, w)}"
        )
    pooled = average_pool(depth, (h, w))
    points = jax.vmap(lambda d: lift_depth(d, fov=fov, far=far, mode=mode))(pooled)
    idx = farthest_point_sample_batch(points, num_side * num_side)
    return jax.vmap(lambda i: _coords_from_indices(i, h, w, num_side, mode, pooled.dtype))(idx)


def check_depth(depth: np.ndarray | jax.Array, name: str = "depth") -> None:
    """Host-side validator: raise ValueError if a depth batch holds NaN or inf values."""
    values = np.asarray(depth)
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} {values.shape} has {int(bad.sum())} non-finite values (first at {first})"
        )


# --------------------------------------------------------------------------------------
# Random coordinates and negatives (SPEC §4)
# --------------------------------------------------------------------------------------


def random_coords(key: jax.Array, batch: int, num_side: int) -> jax.Array:
    """Uniform coords in [-1, 1): (batch, S, S, 2) (the released `torch.rand * 2 - 1`)."""
    return jax.random.uniform(key, (batch, num_side, num_side, 2), minval=-1.0, maxval=1.0)


def negative_permutation(key: jax.Array, batch: int) -> jax.Array:
    """The released `super_perm`: a random permutation whose fixed points i become i+1 mod B.

    The result has no fixed point but need not be a permutation (two entries may coincide),
    exactly as released. Requires batch >= 2.
    """
    if batch < 2:
        raise ValueError(f"negatives need batch >= 2 (no self-pairs possible), got {batch}")
    perm = jax.random.permutation(key, batch)
    perm = jnp.where(perm == jnp.arange(batch), perm + 1, perm)
    return (perm % batch).astype(jnp.int32)


def negative_permutations(key: jax.Array, num: int, batch: int) -> jax.Array:
    """`num` independent `negative_permutation`s: (num, batch) int32."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: negative_permutation(k, batch))(keys)
