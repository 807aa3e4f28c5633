"""Metrics against an independent NumPy statement (brute-force matching), by-hand
cases, and an 8-device sharded run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from depthg_jax.evaluation import metrics


def reference_scores(preds, labels, n_clusters, n_classes, hungarian):
    """The protocol stated directly: count every valid pixel, try every class-cluster match."""
    preds, labels = preds.ravel(), labels.ravel()
    keep = (labels >= 0) & (labels < n_classes) & (preds >= 0) & (preds < n_clusters)
    preds, labels = preds[keep], labels[keep]
    table = np.zeros((n_clusters, n_classes), np.int64)
    np.add.at(table, (preds, labels), 1)
    if hungarian:
        candidates = itertools.permutations(range(n_clusters), n_classes)
    else:
        candidates = [tuple(range(n_classes))]
    best = max(candidates, key=lambda c: sum(table[c[j], j] for j in range(n_classes)))
    ious = []
    for j, cluster in enumerate(best):
        tp = table[cluster, j]
        union = table[cluster].sum() + table[:, j].sum() - tp
        ious.append(tp / union if union else np.nan)
    unmatched = [c for c in range(n_clusters) if c not in best]
    if unmatched:  # STEGO pools unmatched clusters into one pseudo-class that matches nothing.
        ious.append(0.0 if table[unmatched].sum() else np.nan)
    accuracy = sum(table[best[j], j] for j in range(n_classes)) / len(labels)
    return accuracy, np.nanmean(ious), np.array(ious[:n_classes])


def scores_of(preds, labels, n_clusters, n_classes, hungarian):
    counts = metrics.confusion(jnp.asarray(preds), jnp.asarray(labels), n_clusters, n_classes)
    return metrics.scores(np.asarray(counts), hungarian)


@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_scores_match_brute_force_reference(seed, extra):
    rng = np.random.default_rng(seed)
    n = 4
    labels = rng.integers(-1, n + 1, size=(3, 12, 10))  # includes -1 and n: both ignored
    truth_to_cluster = rng.permutation(n + extra)[:n]
    preds = np.where(rng.random(labels.shape) < 0.6, truth_to_cluster[labels.clip(0, n - 1)], 0)
    noise = rng.integers(0, n + extra, size=labels.shape)
    preds = np.where(rng.random(labels.shape) < 0.5, preds, noise)
    got = scores_of(preds, labels, n + extra, n, hungarian=True)
    acc, miou, iou = reference_scores(preds, labels, n + extra, n, hungarian=True)
    np.testing.assert_allclose(got["accuracy"], acc, rtol=1e-12)
    np.testing.assert_allclose(got["miou"], miou, rtol=1e-12)
    np.testing.assert_allclose(got["iou"], iou, rtol=1e-12)
    assert 0 <= got["accuracy"] <= 1 and 0 <= got["miou"] <= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_scores_match_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 5, size=(2, 9, 7))
    preds = rng.integers(0, 5, size=labels.shape)
    got = scores_of(preds, labels, 5, 5, hungarian=False)
    acc, miou, iou = reference_scores(preds, labels, 5, 5, hungarian=False)
    np.testing.assert_allclose([got["accuracy"], got["miou"]], [acc, miou], rtol=1e-12)
    np.testing.assert_allclose(got["iou"], iou, rtol=1e-12)


def test_permuted_perfect_prediction_scores_one():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=(2, 16, 16))
    perm = rng.permutation(6)
    got = scores_of(perm[labels], labels, 6, 6, hungarian=True)
    assert got["accuracy"] == 1.0 and got["miou"] == 1.0
    np.testing.assert_array_equal(got["cluster_to_class"][perm], np.arange(6))
    np.testing.assert_array_equal(
        metrics.map_clusters(perm[labels], got["cluster_to_class"]), labels
    )
    # Without matching, the same prediction is mostly wrong.
    assert scores_of(perm[labels], labels, 6, 6, hungarian=False)["accuracy"] < 0.5


def test_hand_computed_case():
    # labels 0 0 0 1 1 2 (and one ignored), preds 1 1 0 0 0 0 (and one on the ignored pixel)
    labels = np.array([[0, 0, 0, 1, 1, 2, -1]])
    preds = np.array([[1, 1, 0, 0, 0, 0, 2]])
    counts = np.asarray(metrics.confusion(jnp.asarray(preds), jnp.asarray(labels), 3, 3))
    np.testing.assert_array_equal(counts, [[1, 2, 1], [2, 0, 0], [0, 0, 0]])
    # Identity: class0 tp 1, predicted 4, labelled 3 -> 1/(4+3-1); class1, class2 tp 0. Acc 1/6.
    lin = metrics.scores(counts, hungarian=False)
    assert lin["accuracy"] == pytest.approx(1 / 6)
    np.testing.assert_allclose(lin["iou"], [1 / 6, 0, 0])
    # Best matching: cluster1->class0 (2), cluster0->class1 (2), cluster2->class2 (0): acc 4/6.
    # IoU class0 = 2/(2+3-2) = 2/3; class1 = 2/(4+2-2) = 1/2; class2 = 0/(0+1) = 0.
    hun = metrics.scores(counts, hungarian=True)
    assert hun["accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_allclose(hun["iou"], [2 / 3, 1 / 2, 0])
    assert hun["miou"] == pytest.approx((2 / 3 + 1 / 2) / 3)
    np.testing.assert_array_equal(hun["cluster_to_class"], [1, 0, 2])


def test_absent_class_is_nan_and_left_out_of_the_mean():
    labels = np.array([[0, 0, 1, 1]])
    preds = np.array([[0, 0, 1, 0]])
    got = scores_of(preds, labels, 3, 3, hungarian=False)
    assert np.isnan(got["iou"][2])
    assert got["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_valid_mask_drops_padded_examples():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=(4, 5, 5))
    preds = rng.integers(0, 3, size=(4, 5, 5))
    valid = np.array([True, False, True, False])
    got = metrics.confusion(jnp.asarray(preds), jnp.asarray(labels), 3, 3, jnp.asarray(valid))
    want = metrics.confusion(jnp.asarray(preds[valid]), jnp.asarray(labels[valid]), 3, 3)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == jnp.int32 and int(got.sum()) == 50


def test_confusion_unchanged_over_eight_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 CPU devices"
    mesh = Mesh(np.asarray(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(5)
    labels = rng.integers(-1, 7, size=(16, 12, 12)).astype(np.int32)
    preds = rng.integers(0, 9, size=(16, 12, 12)).astype(np.int32)
    valid = rng.random(16) < 0.7
    fn = jax.jit(lambda p, l, v: metrics.confusion(p, l, 9, 7, v))
    sharded = jax.device_put((preds, labels, valid), NamedSharding(mesh, P("data")))
    assert len(sharded[0].sharding.device_set) == 8
    got = np.asarray(fn(*sharded))
    single = np.asarray(fn(*jax.device_put((preds, labels, valid), jax.devices()[0])))
    np.testing.assert_array_equal(got, single)
    keep = valid[:, None, None] & (labels >= 0) & (labels < 7)
    want = np.zeros((9, 7), np.int64)
    np.add.at(want, (preds[keep], labels[keep]), 1)
    np.testing.assert_array_equal(got, want)


def test_bad_input_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        metrics.confusion(jnp.zeros((2, 3), int), jnp.zeros((2, 4), int), 2, 2)
    with pytest.raises(ValueError, match="at least as many clusters"):
        metrics.scores(np.ones((2, 3)), hungarian=True)
    with pytest.raises(ValueError, match="empty"):
        metrics.scores(np.zeros((3, 3)), hungarian=True)
