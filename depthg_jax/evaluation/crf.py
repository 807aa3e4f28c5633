"""Dense CRF post-processing of the final evaluation protocol (docs/evaluation.md), on the host.

Fully connected CRF (Krähenbühl & Koltun) via pydensecrf2, with STEGO's released settings:
10 mean-field iterations, a Gaussian kernel (sxy 1, weight 3) and a bilateral kernel (sxy 67,
srgb 3, weight 4) on the uint8 image. The unary is -log of the softmax of the given scores,
probabilities clipped at 1e-5. `dense_crf_batch` spreads images over a process pool, one image per
task, because pydensecrf runs single-threaded.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor

import numpy as np

ITERATIONS = 10
GAUSSIAN_SXY = 1.0
GAUSSIAN_WEIGHT = 3.0
BILATERAL_SXY = 67.0
BILATERAL_SRGB = 3.0
BILATERAL_WEIGHT = 4.0
PROB_CLIP = 1e-5


def _check_pair(image: np.ndarray, log_probs: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if log_probs.ndim != 3 or log_probs.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"log_probs must be (H, W, n) with the image's H, W; got {log_probs.shape} for image "
            f"{image.shape}"
        )


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def dense_crf(image: np.ndarray, log_probs: np.ndarray, iterations: int = ITERATIONS) -> np.ndarray:
    """Refines per-pixel class scores with a dense CRF on the image.

    Args:
      image: (H, W, 3) uint8 RGB.
      log_probs: (H, W, n) log-probabilities or logits (softmax is applied first).
      iterations: mean-field iterations.
    Returns:
      (H, W, n) float32 marginal probabilities after inference.
    """
    import pydensecrf.densecrf as dcrf  # Imported here so worker start-up stays cheap elsewhere.

    image = np.asarray(image)
    log_probs = np.asarray(log_probs, dtype=np.float32)
    _check_pair(image, log_probs)
    h, w, n = log_probs.shape
    probs = np.clip(_softmax(log_probs), PROB_CLIP, 1.0)
    unary = np.ascontiguousarray(-np.log(probs).reshape(h * w, n).T)
    # STEGO hands the bilateral term BGR; the lattice approximation is not exactly symmetric in
    # the colour axes, so keep that order to reproduce it.
    bgr = np.ascontiguousarray(image[..., ::-1])
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_WEIGHT)
    crf.addPairwiseBilateral(
        sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_WEIGHT
    )
    q = np.asarray(crf.inference(iterations), dtype=np.float32)
    return q.reshape(n, h, w).transpose(1, 2, 0)


def _crf_labels(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return dense_crf(*pair).argmax(-1).astype(np.int32)


def make_crf_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for `dense_crf_batch`; spawned (not forked) because JAX is multithreaded."""
    workers = workers or os.cpu_count() or 1
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def dense_crf_batch(
    images: np.ndarray, log_probs: np.ndarray, pool: Executor | None = None
) -> np.ndarray:
    """Dense CRF on each image of a batch, in parallel when given a pool; returns the argmax.

    Args:
      images: (B, H, W, 3) uint8 RGB.
      log_probs: (B, H, W, n) log-probabilities or logits.
      pool: an executor from `make_crf_pool` (reuse it across batches); None runs serially.
    Returns:
      (B, H, W) int32 labels.
    """
    images = np.asarray(images)
    log_probs = np.asarray(log_probs, dtype=np.float32)
    if images.shape[:1] != log_probs.shape[:1]:
        raise ValueError(f"images {images.shape} and log_probs {log_probs.shape}: batch differs")
    pairs = list(zip(images, log_probs, strict=True))
    if pool is None:
        results = [_crf_labels(p) for p in pairs]
    else:
        results = list(pool.map(_crf_labels, pairs))
    if not results:
        return np.zeros(log_probs.shape[:3], np.int32)
    return np.stack(results)
