"""Head, probes and channel dropout against PyTorch (Conv2d, Dropout2d, F.normalize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg_jax.models.head import (
    ClusterProbe,
    LinearProbe,
    SegmentationHead,
    channel_dropout,
    cluster_log_probs,
)


def to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def torch_conv(dense_params) -> torch.nn.Conv2d:
    """A torch 1x1 Conv2d holding a flax Dense's kernel (in, out) and bias."""
    kernel = np.asarray(dense_params["kernel"])
    conv = torch.nn.Conv2d(kernel.shape[0], kernel.shape[1], 1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.T.copy())[:, :, None, None])
        conv.bias.copy_(torch.from_numpy(np.array(dense_params["bias"])))
    return conv


def assert_channel_dropout_pattern(out, x, rate):
    """Each (image, channel) is either all zero or x / (1 - rate); returns the keep mask."""
    out, x = np.asarray(out), np.asarray(x)
    kept = np.abs(out).sum(axis=(1, 2)) > 0  # (B, C)
    scaled = x / (1 - rate)
    np.testing.assert_allclose(out, np.where(kept[:, None, None, :], scaled, 0), rtol=1e-6)
    return kept


def test_channel_dropout_matches_dropout2d_semantics():
    rate = 0.25
    x = jax.random.uniform(jax.random.key(0), (4, 3, 5, 256), minval=0.5, maxval=1.5)
    out = channel_dropout(jax.random.key(1), x, rate)
    kept = assert_channel_dropout_pattern(out, x, rate)
    assert abs((1 - kept.mean()) - rate) < 0.06
    assert (kept[0] != kept[1]).any()  # masks are drawn per image
    # torch's Dropout2d zeroes whole channels and scales survivors by the same factor.
    drop = torch.nn.Dropout2d(rate).train()
    ref = drop(to_nchw(x)).permute(0, 2, 3, 1).numpy()
    ref_kept = np.abs(ref).sum(axis=(1, 2)) > 0
    ratio = ref[..., ref_kept[0]][0] / np.asarray(x)[..., ref_kept[0]][0]
    np.testing.assert_allclose(ratio, 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_allclose(ref[:, :, :, ~ref_kept[0]][0], 0)


def test_channel_dropout_edge_rates():
    x = jnp.ones((2, 2, 2, 3))
    assert channel_dropout(jax.random.key(0), x, 0.0) is x
    np.testing.assert_array_equal(channel_dropout(jax.random.key(0), x, 1.0), 0)
    with pytest.raises(ValueError, match="rate must be in"):
        channel_dropout(jax.random.key(0), x, 1.5)


@pytest.fixture(scope="module")
def head_setup():
    feats = jax.random.normal(jax.random.key(0), (2, 3, 4, 16))
    head = SegmentationHead(dim=8)
    params = head.init(jax.random.key(1), feats, deterministic=True)["params"]
    return head, params, feats


def test_head_deterministic_matches_torch(head_setup):
    head, params, feats = head_setup
    assert set(params) == {"linear", "nonlinear_1", "nonlinear_2"}
    code = head.apply({"params": params}, feats, deterministic=True)
    linear = torch_conv(params["linear"])
    nonlinear = torch.nn.Sequential(
        torch_conv(params["nonlinear_1"]), torch.nn.ReLU(), torch_conv(params["nonlinear_2"])
    )
    with torch.no_grad():
        f = to_nchw(feats)
        ref = (linear(f) + nonlinear(f)).permute(0, 2, 3, 1).numpy()
    assert code.shape == (2, 3, 4, 8)
    np.testing.assert_allclose(code, ref, atol=1e-5)


def identity_dense(c, scale=1.0):
    return {"kernel": scale * jnp.eye(c), "bias": jnp.zeros(c)}


def test_head_draws_two_independent_channel_masks():
    """With identity/zero weights the code exposes drop1(f) and drop2(f) separately."""
    c, rate = 64, 0.5
    feats = jax.random.uniform(jax.random.key(0), (2, 2, 3, c), minval=0.5, maxval=1.5)
    head = SegmentationHead(dim=c, dropout=rate)
    only_linear = {
        "linear": identity_dense(c),
        "nonlinear_1": identity_dense(c),
        "nonlinear_2": identity_dense(c, 0.0),
    }
    only_nonlinear = {**only_linear, "linear": identity_dense(c, 0.0)}
    only_nonlinear["nonlinear_2"] = identity_dense(c)
    rngs = {"dropout": jax.random.key(3)}
    drop1 = head.apply({"params": only_linear}, feats, deterministic=False, rngs=rngs)
    drop2 = head.apply({"params": only_nonlinear}, feats, deterministic=False, rngs=rngs)
    mask1 = assert_channel_dropout_pattern(drop1, feats, rate)
    mask2 = assert_channel_dropout_pattern(drop2, feats, rate)
    assert (mask1 != mask2).any()
    assert 0 < mask1.mean() < 1 and 0 < mask2.mean() < 1
    other = head.apply(
        {"params": only_linear}, feats, deterministic=False, rngs={"dropout": jax.random.key(4)}
    )
    assert not np.array_equal(other, drop1)
    np.testing.assert_array_equal(
        head.apply({"params": only_linear}, feats, deterministic=True), feats
    )


def test_init_matches_torch_conv2d_default():
    """kaiming_uniform(a=sqrt(5)) and the bias rule give U(+-1/sqrt(fan_in)) in torch."""
    c, k = 384, 70
    params = SegmentationHead(dim=k).init(
        jax.random.key(0), jnp.zeros((1, 1, 1, c)), deterministic=True
    )["params"]
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(c, c, 1)
    bound = 1 / np.sqrt(c)
    for name, ours, theirs in [
        ("weight", np.asarray(params["nonlinear_1"]["kernel"]), ref.weight.detach().numpy()),
        ("bias", np.asarray(params["nonlinear_1"]["bias"]), ref.bias.detach().numpy()),
    ]:
        for values in (ours, theirs):
            assert np.abs(values).max() <= bound, name
            assert np.abs(values).max() > 0.97 * bound, name
        # Uniform(+-b) has std b/sqrt(3); both draws must agree with it and each other.
        tol = 0.03 if name == "weight" else 0.15
        np.testing.assert_allclose(ours.std(), bound / np.sqrt(3), rtol=tol)
        np.testing.assert_allclose(ours.std(), theirs.std(), rtol=2 * tol)
    assert np.abs(np.asarray(params["linear"]["kernel"])).max() <= bound


def test_cluster_probe_matches_torch_cosine():
    code = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)
    code[0, 0, 0] = 0  # F.normalize's eps: a zero vector gives zero similarity, not NaN
    probe = ClusterProbe(n_classes=5)
    params = probe.init(jax.random.key(0), code)["params"]
    inner = probe.apply({"params": params}, code)
    clusters = torch.from_numpy(np.array(params["clusters"]))
    ref = torch.einsum(
        "bchw,nc->bnhw", F.normalize(to_nchw(code), dim=1), F.normalize(clusters, dim=1)
    )
    np.testing.assert_allclose(inner, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(inner[0, 0, 0], 0)
    log_probs = cluster_log_probs(inner)
    ref_log = F.log_softmax(2.0 * ref, dim=1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(log_probs, ref_log, atol=1e-6)


def test_cluster_probe_init_is_standard_normal():
    params = ClusterProbe(n_classes=27).init(jax.random.key(0), jnp.zeros((1, 1, 1, 90)))
    clusters = np.asarray(params["params"]["clusters"])
    assert clusters.shape == (27, 90)
    assert abs(clusters.mean()) < 0.1 and abs(clusters.std() - 1) < 0.06


def test_linear_probe_matches_torch_conv():
    code = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
    probe = LinearProbe(n_classes=5)
    params = probe.init(jax.random.key(1), code)["params"]
    logits = probe.apply({"params": params}, code)
    with torch.no_grad():
        ref = torch_conv(params["linear"])(to_nchw(code)).permute(0, 2, 3, 1).numpy()
    assert logits.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    assert np.abs(np.asarray(params["linear"]["kernel"])).max() <= 1 / np.sqrt(8)
