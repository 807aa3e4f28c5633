"""Where the losses look: the release's sampler, depth lifting, FPS, coordinates.

Pure JAX, NHWC. Every function takes arrays and Python scalars; randomness comes in as
keys. Semantics follow the released DepthG code (docs/method.md#sampling and
#depth-lifting-and-farthest-point-sampling) so the two can be compared term by term.

Coordinates are (x, y) = (column, row) in [-1, 1], as in `torch.nn.functional.grid_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.method.image_ops import _check_rank, _pair, average_pool, grid_sample

MODES = ("reference", "corrected")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_coords(name: str, coords: jax.Array, batch: int) -> None:
    _check_rank(name, coords, 4, "(B, S, S, 2)")
    if coords.shape[0] != batch or coords.shape[1] != coords.shape[2] or coords.shape[3] != 2:
        raise ValueError(f"{name} must be (B={batch}, S, S, 2), got shape {tuple(coords.shape)}")


# --------------------------------------------------------------------------------------
# The release's sampler
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Depth lifting and farthest point sampling (docs/method.md)
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
    """Lift a depth map (H, W) to points (H*W, 3), row-major (docs/method.md).

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
    `depthg_jax.runtime.xla.jit` on CPU).
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
    """FPS indices (S²,) of an (h, w) grid -> sample coords (S, S, 2), docs/method.md."""
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
    """Depth-guided sample coordinates (B, S, S, 2) by farthest point sampling (docs/method.md).

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
# Random coordinates and negatives (docs/method.md)
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
