"""Dense CRF: it follows image edges (measured against the truth), and the pool changes nothing."""

import numpy as np
import pytest

from depthg_jax.evaluation import crf


def make_scene(seed: int, size: int = 48):
    """An image of three flat-coloured regions, its true segmentation, and a noisy unary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.int64)
    truth[(yy - 20) ** 2 + (xx - 26) ** 2 < 14**2] = 1
    truth[(yy > 34) & (xx < 30)] = 2
    colours = np.array([[40, 90, 200], [220, 60, 50], [60, 170, 70]])
    image = np.clip(colours[truth] + rng.normal(0, 2, (size, size, 3)), 0, 255).astype(np.uint8)
    logits = np.eye(3)[truth] + rng.normal(0, 0.9, (size, size, 3))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return image, log_probs.astype(np.float32), truth


@pytest.mark.parametrize("seed", [0, 1])
def test_crf_agrees_with_edge_aligned_truth_more_than_unary(seed):
    image, log_probs, truth = make_scene(seed)
    unary_agreement = (log_probs.argmax(-1) == truth).mean()
    probs = crf.dense_crf(image, log_probs)
    crf_agreement = (probs.argmax(-1) == truth).mean()
    assert unary_agreement < 0.75  # the unary really is noisy
    assert crf_agreement > unary_agreement + 0.2
    assert crf_agreement > 0.97
    assert probs.shape == log_probs.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)


def test_crf_uses_the_image():
    # Same unary on a flat grey image: no edges to follow, so the CRF recovers less of the truth.
    image, log_probs, truth = make_scene(0)
    with_edges = (crf.dense_crf(image, log_probs).argmax(-1) == truth).mean()
    flat = np.full_like(image, 128)
    without_edges = (crf.dense_crf(flat, log_probs).argmax(-1) == truth).mean()
    assert with_edges > without_edges + 0.05


def test_crf_batch_in_a_pool_equals_serial():
    scenes = [make_scene(s, size=32) for s in range(4)]
    images = np.stack([s[0] for s in scenes])
    log_probs = np.stack([s[1] for s in scenes])
    serial = crf.dense_crf_batch(images, log_probs)
    with crf.make_crf_pool(2) as pool:
        parallel = crf.dense_crf_batch(images, log_probs, pool)
    np.testing.assert_array_equal(serial, parallel)
    assert serial.shape == (4, 32, 32) and serial.dtype == np.int32
    np.testing.assert_array_equal(serial[1], crf.dense_crf(images[1], log_probs[1]).argmax(-1))


def test_crf_bad_input_names_shapes():
    image, log_probs, _ = make_scene(0, size=16)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        crf.dense_crf(image.astype(np.float32), log_probs)
    with pytest.raises(ValueError, match=r"\(16, 15, 3\).*\(16, 16, 3\)"):
        crf.dense_crf(image, log_probs[:, :15])
