"""Segmentation metrics: confusion counts on device, matching and scores on the host.

`confusion` is jittable and sharding-agnostic: under `jit` with the batch split over a mesh the
compiler reduces the per-device counts, so the totals are those of the whole batch.
`scores` reproduces the released STEGO `UnsupervisedMetrics.compute` (Hungarian matching that
maximises matched pixels for the cluster probe, identity for the linear probe), returning
fractions in [0, 1] rather than percentages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(
    preds: jax.Array,
    labels: jax.Array,
    num_preds: int,
    num_classes: int,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Counts (prediction, label) pairs: a (num_preds, num_classes) int32 matrix.

    Args:
      preds: (B, ...) integer predictions (cluster ids or classes).
      labels: (B, ...) integer ground truth, same shape; values outside [0, num_classes) are
        ignored (e.g. -1 for "unlabelled").
      num_preds: number of prediction ids (n_classes + extra clusters); ids outside
        [0, num_preds) are ignored.
      num_classes: number of ground-truth classes.
      valid: optional (B,) bool; False marks padded examples, whose pixels are ignored.
    Returns:
      (num_preds, num_classes) int32, rows predictions, columns labels.
    """
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} must have the same shape")
    preds = preds.astype(jnp.int32)
    labels = labels.astype(jnp.int32)
    keep = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_preds)
    if valid is not None:
        if valid.shape != preds.shape[:1]:
            raise ValueError(f"valid must be (B,) = {preds.shape[:1]}, got shape {valid.shape}")
        keep = keep & valid.reshape(valid.shape + (1,) * (preds.ndim - 1)).astype(bool)
    # Ignored pixels go to bin 0 with weight 0, so the bin index is always in range.
    index = jnp.where(keep, preds * num_classes + labels, 0)
    counts = jnp.bincount(
        index.reshape(-1),
        weights=keep.reshape(-1).astype(jnp.int32),
        length=num_preds * num_classes,
    )
    return counts.astype(jnp.int32).reshape(num_preds, num_classes)


def match_clusters(confusion: np.ndarray) -> np.ndarray:
    """For each class, the cluster assigned to it by a matching that maximises matched pixels.

    Args:
      confusion: (num_preds, num_classes) counts with num_preds >= num_classes.
    Returns:
      (num_classes,) int cluster index per class.
    """
    confusion = np.asarray(confusion)
    class_to_cluster = np.empty(confusion.shape[1], dtype=np.int64)
    if confusion.shape[0] == confusion.shape[1]:
        # Square: solve with clusters as rows, as STEGO does, so ties break the same way.
        rows, cols = linear_sum_assignment(confusion, maximize=True)
        class_to_cluster[cols] = rows
    else:
        # Extra clusters: solve with classes as rows (STEGO's choice) so every class gets one.
        rows, cols = linear_sum_assignment(confusion.T, maximize=True)
        class_to_cluster[rows] = cols
    return class_to_cluster


def _aligned_histogram(confusion: np.ndarray, hungarian: bool) -> tuple[np.ndarray, np.ndarray]:
    """The confusion re-indexed so that row i is the prediction counted as class i.

    Returns (histogram, cluster_to_class); with extra clusters the unmatched clusters are pooled
    into one extra row (and a zero column is added), as STEGO does.
    """
    num_preds, num_classes = confusion.shape
    if not hungarian:
        if num_preds != num_classes:
            raise ValueError(
                f"identity assignment needs a square confusion, got shape {confusion.shape}"
            )
        return confusion, np.arange(num_classes)
    if num_preds < num_classes:
        raise ValueError(
            f"Hungarian matching needs at least as many clusters as classes, got confusion "
            f"shape {confusion.shape} (rows clusters, columns classes)"
        )
    class_to_cluster = match_clusters(confusion)
    cluster_to_class = np.full(num_preds, -1, dtype=np.int64)
    cluster_to_class[class_to_cluster] = np.arange(num_classes)
    histogram = confusion[class_to_cluster]
    if num_preds > num_classes:
        unmatched = confusion[cluster_to_class < 0].sum(axis=0, keepdims=True)
        histogram = np.concatenate([histogram, unmatched], axis=0)
        histogram = np.concatenate([histogram, np.zeros((num_classes + 1, 1), np.int64)], axis=1)
    return histogram, cluster_to_class


def scores(confusion: np.ndarray, hungarian: bool) -> dict:
    """Pixel accuracy, mIoU and per-class IoU of a confusion matrix, as STEGO reports them.

    Args:
      confusion: (num_preds, num_classes) counts, rows predictions, columns labels.
      hungarian: True for the cluster probe (match clusters to classes maximising matched
        pixels; extra clusters allowed), False for the linear probe (identity).
    Returns:
      dict with "accuracy" and "miou" (floats in [0, 1]); "iou" (num_classes,) float64 with NaN
      for classes neither present nor predicted (excluded from the mean); "assignment" (also
      "cluster_to_class"), (num_preds,) int, the class of each prediction id, -1 if unmatched;
      "histogram", the aligned confusion (rows predicted class, columns true class; with extra
      clusters one more row and column pool the unmatched clusters, and like STEGO that
      pseudo-class's IoU, 0 when it has pixels, enters the mean); "iou_unmatched" (float, NaN
      without extra clusters).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.ndim != 2:
        raise ValueError(f"confusion must be 2-D (num_preds, num_classes), got {confusion.shape}")
    total = confusion.sum()
    if total == 0:
        raise ValueError("confusion is empty: no valid labelled pixels were counted")
    num_classes = confusion.shape[1]
    histogram, cluster_to_class = _aligned_histogram(confusion, hungarian)
    tp = np.diag(histogram).astype(np.float64)
    union = histogram.sum(axis=0) + histogram.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
    return {
        "accuracy": float(tp.sum() / histogram.sum()),
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "iou": iou[:num_classes],
        "iou_unmatched": float(iou[num_classes]) if len(iou) > num_classes else float("nan"),
        "cluster_to_class": cluster_to_class,
        "assignment": cluster_to_class,
        "histogram": histogram,
    }


def map_clusters(preds: np.ndarray, cluster_to_class: np.ndarray) -> np.ndarray:
    """Turns cluster ids into matched class ids (-1 for unmatched clusters)."""
    return np.asarray(cluster_to_class)[np.asarray(preds)]
