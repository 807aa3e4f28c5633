"""depthg_jax.method.losses against NumPy statements of docs/method.md and PyTorch's functions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg_jax.method import losses

TOL = 1e-5
# Jitted once per static configuration: eager dispatch of every op is slow on 2 cores.
loss_terms = jax.jit(losses.loss_terms)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def torch_sample(x: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """docs/method.md sampling: grid_sample of the transposed grid, bilinear, border, corners."""
    grid = torch.from_numpy(np.array(coords)).permute(0, 2, 1, 3)
    out = F.grid_sample(nchw(x), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1).numpy()


def np_norm(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.sqrt((x**2).sum(-1, keepdims=True)), 1e-10)


def np_corr(a, b):
    return np.einsum("nhwc,nijc->nhwij", np_norm(a), np_norm(b))


def np_clamp(s, zero_clamp=True, stabilize=False):
    s = np.maximum(s, 0.0 if zero_clamp else -9999.0)
    return np.minimum(s, 0.8) if stabilize else s


def np_term(f1, f2, c1, c2, b, pointwise, zero_clamp=True, stabilize=False):
    """docs/method.md for one pair: mean(−clamp(corr(c1,c2))·(F − b))."""
    fd = np_corr(f1, f2)
    if pointwise:
        fd = fd - fd.mean(axis=(3, 4), keepdims=True) + fd.mean()
    return np.mean(-np_clamp(np_corr(c1, c2), zero_clamp, stabilize) * (fd - b))


def np_corrected_depth(code, depth, coords, hw, b, fov=90.0, far=5.0):
    """docs/method.md corrected: depth read at the code's coords, lifted (degrees), 3D proximity."""
    h, w = hw
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(depth)[:, None], hw)[:, 0].numpy()
    d = torch_sample(pooled[..., None], coords)[..., 0].astype(np.float64)
    pos = np.swapaxes(coords, 1, 2).astype(np.float64)  # out[i, j] was read at coords[j, i]
    col = (pos[..., 0] + 1) / 2 * (w - 1)
    row = (pos[..., 1] + 1) / 2 * (h - 1)
    k = 2 * math.tan(math.radians(fov) / 2)
    p = np.stack([k * d * (col - w / 2) / w, k * d * (row - h / 2) / h, -far * d], -1)
    p = p.reshape(len(p), -1, 3)
    dist = np.sqrt(((p[:, :, None] - p[:, None]) ** 2).sum(-1))
    big_d = 1 - dist / dist.max(axis=(1, 2), keepdims=True)
    s = code.shape[1]
    big_d = big_d.reshape(len(p), s, s, s, s)
    return np.mean(-np_clamp(np_corr(code, code)) * (big_d - b))


def random_inputs(seed=0, b=3, h=6, w=5, c=8, k=4, s=3, hd=12, wd=10):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(
        feats=f32(b, h, w, c),
        feats_pos=f32(b, h, w, c),
        code=f32(b, h, w, k),
        code_pos=f32(b, h, w, k),
        depth=rng.uniform(1, 255, (b, hd, wd)).astype(np.float32),
        depth_pos=rng.uniform(1, 255, (b, hd, wd)).astype(np.float32),
        coords1=rng.uniform(-1, 1, (b, s, s, 2)).astype(np.float32),
        coords2=rng.uniform(-1, 1, (b, s, s, 2)).astype(np.float32),
        neg_perms=np.array([[1, 2, 0], [2, 0, 1], [1, 0, 0]], np.int32),
    )


def test_normalize_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    x[0, 0, 0] = 0.0  # zero vector: eps keeps it 0, not NaN
    want = F.normalize(torch.from_numpy(x), dim=-1, eps=1e-10).numpy()
    np.testing.assert_allclose(np.asarray(losses.normalize(jnp.asarray(x))), want, atol=TOL)


def test_correlation_shape_and_values():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    got = losses.correlation(jnp.asarray(a), jnp.asarray(b))
    assert got.shape == (2, 3, 3, 3, 3)
    np.testing.assert_allclose(np.asarray(got), np.einsum("nhwc,nijc->nhwij", a, b), atol=TOL)
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 4\) and \(2, 3, 3, 5\)"):
        losses.correlation(jnp.asarray(a), jnp.zeros((2, 3, 3, 5)))


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("zero_clamp,stabilize", [(True, False), (False, False), (True, True)])
def test_correlation_term_matches_spec(pointwise, zero_clamp, stabilize):
    rng = np.random.default_rng(2)
    f1, f2 = (rng.standard_normal((2, 4, 4, 6)).astype(np.float32) for _ in range(2))
    c1, c2 = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(2))
    loss, cd = losses.correlation_term(
        *map(jnp.asarray, (f1, f2, c1, c2)), 0.3, pointwise, zero_clamp, stabilize
    )
    want = np_term(f1, f2, c1, c2, 0.3, pointwise, zero_clamp, stabilize)
    assert float(loss) == pytest.approx(want, abs=TOL)
    np.testing.assert_allclose(np.asarray(cd), np_corr(c1, c2), atol=TOL)


def test_reference_depth_term_matches_release_statement():
    x = random_inputs(3)
    code = torch_sample(x["code"], x["coords1"])
    depth = x["depth"].copy()
    # Positive depth: D ≡ 1 (docs/method.md).
    got = losses.depth_feature_term(jnp.asarray(code), jnp.asarray(depth), 0.03, "reference")
    want = np.mean(-np_clamp(np_corr(code, code)) * (1.0 - 0.03))
    assert float(got) == pytest.approx(want, abs=TOL)
    # Zeros in the depth (nearest pixels) give D = 0 where the resized depth is 0.
    depth[:, :6, :] = 0.0
    s = code.shape[1]
    d = F.interpolate(
        torch.from_numpy(depth)[:, None], size=(s, s), mode="bilinear", align_corners=True
    )
    d = F.normalize(d, dim=1, eps=1e-10)[:, 0].numpy().astype(np.float64)
    dd = np.einsum("nhw,nij->nhwij", d, d)
    want = np.mean(-np_clamp(np_corr(code, code)) * (dd - 0.03))
    got = losses.depth_feature_term(jnp.asarray(code), jnp.asarray(depth), 0.03, "reference")
    assert float(got) == pytest.approx(want, abs=TOL)
    assert (dd == 0).any() and (dd == 1).any()


def test_corrected_depth_term_matches_spec():
    x = random_inputs(4)
    code = torch_sample(x["code"], x["coords1"])
    got = losses.depth_feature_term(
        jnp.asarray(code),
        jnp.asarray(x["depth"]),
        0.03,
        "corrected",
        coords=jnp.asarray(x["coords1"]),
        feature_hw=(6, 5),
        fov=90.0,
        far=5.0,
    )
    want = np_corrected_depth(code, x["depth"], x["coords1"], (6, 5), 0.03)
    assert float(got) == pytest.approx(want, abs=TOL)


def test_depth_term_dependence_on_depth_values():
    x = random_inputs(5)
    code = jnp.asarray(torch_sample(x["code"], x["coords1"]))
    kw = dict(coords=jnp.asarray(x["coords1"]), feature_hw=(6, 5))
    for mode, independent in (("reference", True), ("corrected", False)):
        a = losses.depth_feature_term(code, jnp.asarray(x["depth"]), 0.03, mode, **kw)
        b = losses.depth_feature_term(code, jnp.asarray(x["depth_pos"]), 0.03, mode, **kw)
        assert (float(a) == float(b)) == independent, mode


@pytest.mark.parametrize(
    "pointwise,depth_mode,depth_positive",
    [
        (True, "reference", False),
        (False, "reference", False),
        (True, "corrected", True),
        (False, "corrected", False),
    ],
)
def test_loss_terms_match_spec(pointwise, depth_mode, depth_positive):
    x = random_inputs(6)
    params = losses.LossParams(
        intra_shift=0.07,
        inter_shift=0.025,
        neg_shift=0.761,
        depth_shift=0.03,
        pointwise=pointwise,
        depth_mode=depth_mode,
        depth_positive=depth_positive,
    )
    got = loss_terms(*(jnp.asarray(v) for v in x.values()), params)
    f1, c1 = torch_sample(x["feats"], x["coords1"]), torch_sample(x["code"], x["coords1"])
    f2, c2 = torch_sample(x["feats_pos"], x["coords2"]), torch_sample(x["code_pos"], x["coords2"])
    negs = [
        np_term(
            f1,
            torch_sample(x["feats"][p], x["coords2"]),
            c1,
            torch_sample(x["code"][p], x["coords2"]),
            0.761,
            pointwise,
        )
        for p in x["neg_perms"]
    ]
    if depth_mode == "reference":
        depth = np.mean(-np_clamp(np_corr(c1, c1)) * (1.0 - 0.03))
    else:
        depth = np_corrected_depth(c1, x["depth"], x["coords1"], (6, 5), 0.03)
    if depth_positive:  # the positive's own term, averaged with the anchor's
        depth_pos = np_corrected_depth(c2, x["depth_pos"], x["coords2"], (6, 5), 0.03)
        depth = (depth + depth_pos) / 2
    want = dict(
        intra=np_term(f1, f1, c1, c1, 0.07, pointwise),
        inter=np_term(f1, f2, c1, c2, 0.025, pointwise),
        neg=np.mean(negs),
        depth=depth,
    )
    assert set(got) == set(want)
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], abs=TOL), name


def test_gradient_reaches_only_codes():
    x = {k: jnp.asarray(v) for k, v in random_inputs(8).items()}
    params = losses.LossParams(depth_mode="corrected", depth_positive=True)

    def total(feats, feats_pos, code, code_pos):
        terms = losses.loss_terms(
            feats,
            feats_pos,
            code,
            code_pos,
            x["depth"],
            x["depth_pos"],
            x["coords1"],
            x["coords2"],
            x["neg_perms"],
            params,
        )
        return sum(terms.values())

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(
        x["feats"], x["feats_pos"], x["code"], x["code_pos"]
    )
    assert not np.asarray(grads[0]).any() and not np.asarray(grads[1]).any()
    for g in grads[2:]:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_loss_params_shift_is_traced_not_static():
    x = {k: jnp.asarray(v) for k, v in random_inputs(9).items()}
    traces = []

    @jax.jit
    def run(params):
        traces.append(1)
        return losses.loss_terms(*x.values(), params)["depth"]

    # Shifts as float32 arrays (as the trainer's schedule gives them): one trace for all.
    a = run(losses.LossParams(depth_shift=jnp.float32(0.03)))
    b = run(losses.LossParams(depth_shift=jnp.float32(0.018)))
    assert len(traces) == 1 and float(a) != float(b)
    run(losses.LossParams(depth_shift=jnp.float32(0.03), depth_mode="corrected"))  # static
    assert len(traces) == 2


def test_loss_terms_bad_shapes_are_named():
    x = {k: jnp.asarray(v) for k, v in random_inputs(10).items()}
    params = losses.LossParams()
    bad = dict(x, feats_pos=x["feats_pos"][:, :5])
    with pytest.raises(ValueError, match=r"feats \(3, 6, 5, 8\), feats_pos \(3, 5, 5, 8\)"):
        losses.loss_terms(*bad.values(), params)
    bad = dict(x, code=x["code"][:, :, :4], code_pos=x["code_pos"][:, :, :4])
    with pytest.raises(ValueError, match=r"code \(3, 6, 4, 4\).*feats \(3, 6, 5, 8\)"):
        losses.loss_terms(*bad.values(), params)
    bad = dict(x, neg_perms=x["neg_perms"][:, :2])
    with pytest.raises(ValueError, match=r"neg_perms must be \(neg_samples, B=3\), got \(3, 2\)"):
        losses.loss_terms(*bad.values(), params)
    with pytest.raises(ValueError, match="coords= and feature_hw="):
        losses.depth_feature_term(jnp.zeros((3, 2, 2, 4)), x["depth"], 0.1, "corrected")


def test_cluster_probe_loss_is_hard_assignment():
    inner = np.random.default_rng(11).uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32)
    t = torch.from_numpy(inner).permute(0, 3, 1, 2)
    probs = F.one_hot(t.argmax(1), 5).permute(0, 3, 1, 2).float()
    want = -(probs * t).sum(1).mean().item()
    assert float(losses.cluster_probe_loss(jnp.asarray(inner))) == pytest.approx(want, abs=TOL)


def test_linear_probe_loss_matches_torch():
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    labels = rng.integers(-2, 9, (2, 9, 11))  # some < 0 and >= 6: ignored
    up = F.interpolate(nchw(logits), size=(9, 11), mode="bilinear", align_corners=False)
    flat = up.permute(0, 2, 3, 1).reshape(-1, 6)
    lab = torch.from_numpy(labels).reshape(-1)
    mask = (lab >= 0) & (lab < 6)
    want = F.cross_entropy(flat[mask], lab[mask]).item()
    got = losses.linear_probe_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == pytest.approx(want, abs=TOL)
    none = losses.linear_probe_loss(jnp.asarray(logits), jnp.full((2, 9, 11), -1))
    assert float(none) == 0.0
