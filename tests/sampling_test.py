"""depthg_jax.method.sampling against PyTorch, fpsample and NumPy statements of docs/method.md."""

import math

import fpsample
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import numpy_fps

from depthg_jax.method import image_ops, sampling

TOL = 1e-5


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def torch_sample(x: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """docs/method.md: grid_sample of the spatially transposed grid, bilinear, border, corners."""
    grid = torch.from_numpy(np.array(coords)).permute(0, 2, 1, 3)
    out = F.grid_sample(nchw(x), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return nhwc(out)


def torch_lift(depth: np.ndarray, fov_for_tan: float, far: float = 5.0) -> np.ndarray:
    """docs/method.md lifting in torch float32: (H, W) -> (H*W, 3), row-major."""
    d = torch.from_numpy(depth)
    h, w = d.shape
    factor = 2.0 * torch.tan(torch.tensor([fov_for_tan], dtype=torch.float32) / 2.0)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = factor * d * (cols - w / 2.0) / w
    y = factor * d * (rows - h / 2.0) / h
    return torch.stack([x, y, -d * far], dim=-1).reshape(-1, 3).numpy()


def reference_fps_coords(depth: np.ndarray, hw: tuple[int, int], s: int) -> np.ndarray:
    """The release: pool, lift (fov 90 as radians), FPS, row-major (row/H, col/W)·2−1."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(depth)[:, None], hw)[:, 0].numpy()
    out = []
    for d in pooled:
        idx = numpy_fps(torch_lift(d, 90.0), s * s)
        mask = np.zeros(hw[0] * hw[1], bool)
        mask[idx] = True
        rc = np.argwhere(mask.reshape(hw)).astype(np.float32)
        rc[:, 0] /= hw[0]
        rc[:, 1] /= hw[1]
        out.append(rc.reshape(s, s, 2) * 2 - 1)
    return np.stack(out)


# ------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_grid_sample_matches_torch(align_corners, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    grid = rng.uniform(-1.3, 1.3, (2, 4, 6, 2)).astype(np.float32)  # also out of range
    want = nhwc(
        F.grid_sample(
            nchw(x),
            torch.from_numpy(grid),
            mode="bilinear",
            padding_mode=padding,
            align_corners=align_corners,
        )
    )
    got = image_ops.grid_sample(jnp.asarray(x), jnp.asarray(grid), align_corners, padding)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL)


def test_sample_is_released_sample():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 8, 4)).astype(np.float32)
    coords = rng.uniform(-1, 1, (3, 5, 5, 2)).astype(np.float32)
    got = sampling.sample(jnp.asarray(x), jnp.asarray(coords))
    np.testing.assert_allclose(np.asarray(got), torch_sample(x, coords), atol=TOL)
    # The transpose matters: out[i, j] reads coords[j, i].
    direct = image_ops.grid_sample(jnp.asarray(x), jnp.asarray(coords), True, "border")
    np.testing.assert_allclose(np.asarray(got), np.swapaxes(np.asarray(direct), 1, 2), atol=TOL)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(3, 4), (11, 13), (1, 5), (7, 7)])
def test_resize_bilinear_matches_torch(align_corners, size):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    want = nhwc(F.interpolate(nchw(x), size=size, mode="bilinear", align_corners=align_corners))
    got = image_ops.resize_bilinear(jnp.asarray(x), size, align_corners)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL)


@pytest.mark.parametrize("size", [(7, 5), (28, 23), (30, 1), (13, 11), (4, 4)])
def test_average_pool_matches_torch(size):
    rng = np.random.default_rng(3)
    d = rng.uniform(0, 1, (2, 30, 23)).astype(np.float32)
    want = F.adaptive_avg_pool2d(torch.from_numpy(d)[:, None], size)[:, 0].numpy()
    np.testing.assert_allclose(
        np.asarray(image_ops.average_pool(jnp.asarray(d), size)), want, atol=TOL
    )
    # Depth as the model sees it (0..255): same to float32 relative precision.
    d255 = np.round(d * 255).astype(np.float32)
    want = F.adaptive_avg_pool2d(torch.from_numpy(d255)[:, None], size)[:, 0].numpy()
    got = image_ops.average_pool(jnp.asarray(d255.astype(np.uint8)), size)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-4)


# ------------------------------------------------------------------------- lifting


def test_lift_depth_both_modes():
    rng = np.random.default_rng(4)
    d = rng.uniform(0, 255, (5, 7)).astype(np.float32)
    ref = sampling.lift_depth(jnp.asarray(d), fov=90.0, far=5.0, mode="reference")
    np.testing.assert_allclose(np.asarray(ref), torch_lift(d, 90.0), rtol=1e-6, atol=1e-4)
    cor = sampling.lift_depth(jnp.asarray(d), fov=90.0, far=5.0, mode="corrected")
    np.testing.assert_allclose(np.asarray(cor), torch_lift(d, math.pi / 2), rtol=1e-6, atol=1e-4)
    assert math.isclose(sampling.lift_scale(90.0, "reference"), 3.2396, abs_tol=1e-4)
    assert math.isclose(sampling.lift_scale(90.0, "corrected"), 2.0, abs_tol=1e-12)


# ------------------------------------------------------------------------- FPS


@pytest.mark.parametrize("n,k,dim", [(784, 121, 3), (300, 64, 3), (200, 50, 2)])
def test_fps_matches_fpsample_and_numpy(n, k, dim):
    rng = np.random.default_rng(n + k)
    fps = jax.jit(sampling.farthest_point_sample, static_argnums=1)
    for _ in range(3):
        points = rng.random((n, dim)).astype(np.float32)
        got = np.asarray(fps(jnp.asarray(points), k))
        np.testing.assert_array_equal(got, fpsample.fps_sampling(points, k, start_idx=0))
        np.testing.assert_array_equal(got, numpy_fps(points, k))


def test_fps_properties_and_start():
    rng = np.random.default_rng(5)
    points = rng.random((150, 3)).astype(np.float32)
    start, k = 17, 40
    idx = np.asarray(sampling.farthest_point_sample(jnp.asarray(points), k, start=start))
    assert idx.dtype == np.int32 and idx.shape == (k,)
    assert idx[0] == start
    assert len(set(idx.tolist())) == k
    np.testing.assert_array_equal(idx, numpy_fps(points, k, start))
    for i in range(1, k):  # each new point is the farthest from those before it
        d = ((points[:, None] - points[idx[:i]][None]) ** 2).sum(-1).min(1)
        assert d[idx[i]] == pytest.approx(d.max(), rel=1e-6)


def test_fps_first_index_on_ties():
    # A 4x4 integer grid: many equal distances; the loop statement breaks ties by index.
    g = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
    points = g.astype(np.float32)
    got = np.asarray(sampling.farthest_point_sample(jnp.asarray(points), 16))
    np.testing.assert_array_equal(got, numpy_fps(points, 16))


def test_fps_vmaps_with_traced_start():
    rng = np.random.default_rng(6)
    points = rng.random((4, 100, 3)).astype(np.float32)
    starts = np.array([0, 3, 99, 50])
    fn = jax.jit(jax.vmap(lambda p, s: sampling.farthest_point_sample(p, 20, s)))
    got = np.asarray(fn(jnp.asarray(points), jnp.asarray(starts)))
    for b in range(4):
        np.testing.assert_array_equal(got[b], numpy_fps(points[b], 20, starts[b]))


def test_fps_batch_matches_fpsample_numpy_and_ties_per_cloud():
    rng = np.random.default_rng(7)
    clouds = rng.random((5, 784, 3)).astype(np.float32)
    clouds[4] = 0  # every distance tied: first index each time, as the loop statement
    clouds[4, :, :2] = np.stack(
        np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1
    ).reshape(-1, 2)
    fn = jax.jit(sampling.farthest_point_sample_batch, static_argnums=1)
    got = np.asarray(fn(jnp.asarray(clouds), 121))
    assert got.shape == (5, 121) and got.dtype == np.int32
    for b in range(5):
        np.testing.assert_array_equal(got[b], numpy_fps(clouds[b], 121))
    for b in range(4):  # fpsample breaks exact ties differently; random clouds have none
        np.testing.assert_array_equal(got[b], fpsample.fps_sampling(clouds[b], 121, start_idx=0))
    starts = np.array([5, 0, 783, 400, 28])
    got = np.asarray(fn(jnp.asarray(clouds), 30, jnp.asarray(starts)))
    for b in range(5):
        np.testing.assert_array_equal(got[b], numpy_fps(clouds[b], 30, starts[b]))
    one = np.asarray(fn(jnp.asarray(clouds), 1, jnp.asarray(starts)))
    np.testing.assert_array_equal(one[:, 0], starts)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        sampling.farthest_point_sample_batch(jnp.zeros((10, 3)), 3)


def test_fps_rejects_too_many_samples():
    with pytest.raises(ValueError, match=r"num_samples.*N=10"):
        sampling.farthest_point_sample(jnp.zeros((10, 3)), 11)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        sampling.farthest_point_sample(jnp.zeros((10,)), 3)


# ------------------------------------------------------------------------- FPS coords


def test_depth_fps_coords_reference_is_released():
    rng = np.random.default_rng(7)
    depth = rng.uniform(0, 255, (3, 45, 38)).astype(np.float32)  # non-divisible pooling
    hw, s = (9, 7), 5
    got = sampling.depth_fps_coords(jnp.asarray(depth), hw, s, "reference")
    np.testing.assert_allclose(np.asarray(got), reference_fps_coords(depth, hw, s), atol=1e-6)


def test_depth_fps_coords_corrected_reads_fps_points_in_order():
    rng = np.random.default_rng(8)
    depth = rng.uniform(0, 255, (2, 56, 48)).astype(np.float32)
    hw, s = (7, 6), 4
    feats = rng.standard_normal((2, *hw, 5)).astype(np.float32)
    coords = sampling.depth_fps_coords(jnp.asarray(depth), hw, s, "corrected", fov=90, far=5)
    read = np.asarray(sampling.sample(jnp.asarray(feats), coords))
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(depth)[:, None], hw)[:, 0].numpy()
    for b in range(2):
        idx = numpy_fps(torch_lift(pooled[b], math.pi / 2), s * s)
        want = feats[b].reshape(-1, 5)[idx].reshape(s, s, 5)  # FPS order, row-major
        np.testing.assert_allclose(read[b], want, atol=1e-5)
    # and the torch sampler of the release agrees on the same coordinates
    np.testing.assert_allclose(read, torch_sample(feats, np.asarray(coords)), atol=TOL)


def test_depth_fps_coords_bad_input():
    depth = jnp.ones((2, 16, 16))
    with pytest.raises(ValueError, match=r"num_side\*\*2 = 25"):
        sampling.depth_fps_coords(depth, (4, 4), 5, "reference")
    with pytest.raises(ValueError, match=r"depth must be \(B, H, W\).*\(16, 16\)"):
        sampling.depth_fps_coords(depth[0], (4, 4), 2, "reference")
    with pytest.raises(ValueError, match="mode"):
        sampling.depth_fps_coords(depth, (4, 4), 2, "other")


def test_non_finite_depth_rejected_on_host_and_harmless_on_device():
    depth = np.random.default_rng(9).uniform(0, 255, (2, 16, 16)).astype(np.float32)
    depth[1, 3, 4] = np.nan
    depth[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"depth \(2, 16, 16\) has 2 non-finite.*\(0, 0, 0\)"):
        sampling.check_depth(depth)
    sampling.check_depth(np.nan_to_num(depth))  # finite: passes
    # Documented behaviour without the check: coordinates stay finite, in range, distinct.
    for mode in ("reference", "corrected"):
        c = np.asarray(sampling.depth_fps_coords(jnp.asarray(depth), (8, 8), 3, mode))
        assert np.isfinite(c).all() and (np.abs(c) <= 1).all()
        assert all(len({tuple(p) for p in c[b].reshape(-1, 2)}) == 9 for b in range(2))


def test_shape_errors_name_the_shapes():
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"grid must be \(B=2.*\(3, 2, 2, 2\)"):
        image_ops.grid_sample(x, jnp.zeros((3, 2, 2, 2)), True, "border")
    with pytest.raises(ValueError, match=r"coords must be \(B=2, S, S, 2\).*\(2, 3, 4, 2\)"):
        sampling.sample(x, jnp.zeros((2, 3, 4, 2)))
    with pytest.raises(ValueError, match="padding"):
        image_ops.grid_sample(x, jnp.zeros((2, 2, 2, 2)), True, "reflection")


# ------------------------------------------------------------------------- randomness


def test_random_coords_range_and_keys():
    c = np.asarray(sampling.random_coords(jax.random.key(0), 3, 7))
    assert c.shape == (3, 7, 7, 2)
    assert c.min() >= -1 and c.max() < 1 and c.std() > 0.4
    other = np.asarray(sampling.random_coords(jax.random.key(1), 3, 7))
    assert not np.allclose(c, other)


def test_negative_permutation_is_super_perm():
    draw = jax.jit(
        lambda k, b: (sampling.negative_permutation(k, b), jax.random.permutation(k, b)),
        static_argnums=1,
    )
    for batch in (2, 3, 5, 8):
        for seed in range(10):
            got, perm = map(np.asarray, draw(jax.random.key(seed), batch))
            want = np.where(perm == np.arange(batch), perm + 1, perm) % batch  # docs/method.md
            np.testing.assert_array_equal(got, want)
            assert (got != np.arange(batch)).all()
    with pytest.raises(ValueError, match="batch >= 2"):
        sampling.negative_permutation(jax.random.key(0), 1)


def test_negative_permutations_batched():
    perms = np.asarray(sampling.negative_permutations(jax.random.key(3), 5, 6))
    assert perms.shape == (5, 6) and perms.dtype == np.int32
    assert (perms != np.arange(6)).all()
    assert len({tuple(p) for p in perms}) > 1
