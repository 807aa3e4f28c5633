"""Reference points for a trained head: k-means clustering of the raw backbone features.

STEGO and DepthG report how far their heads improve over clustering the frozen features
directly; the demo prints the same comparison so a user can see what training added.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.evaluation import evaluator
from depthg_jax.method import image_ops
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import xla


def _normalize(x: jax.Array) -> jax.Array:
    return image_ops.l2_normalize(x, eps=1e-10)


def fit_spherical_kmeans(key: jax.Array, x: jax.Array, k: int, iters: int = 50) -> jax.Array:
    """Cosine k-means on unit vectors x (N, D); returns unit centroids (k, D).

    Initialised from k distinct random points; an emptied cluster keeps its centroid.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    x = _normalize(x)
    init = x[jax.random.choice(key, x.shape[0], (k,), replace=False)]

    def update(centroids, _):
        assign = jnp.argmax(x @ centroids.T, axis=-1)
        one_hot = jax.nn.one_hot(assign, k, dtype=x.dtype)
        sums = one_hot.T @ x
        counts = one_hot.sum(0)[:, None]
        new = jnp.where(counts > 0, _normalize(sums), centroids)
        return new, None

    centroids, _ = jax.lax.scan(update, init, None, length=iters)
    return centroids


def backbone_embedding(spec: model_lib.ModelSpec):
    """embed(backbone_params, images uint8 (B,H,W,3)) -> raw backbone features (B,h,w,C)."""
    return lambda params, images: model_lib.frozen_features(spec, params, images)


def code_embedding(spec: model_lib.ModelSpec):
    """embed(params {"backbone", "head", ...}, images uint8) -> the head's code (B,h,w,K)."""
    return lambda params, images: model_lib.compute_code(spec, params, images)


def kmeans_predictor(embed, centroids: jax.Array) -> evaluator.PredictFn:
    """Predicts the nearest centroid (cosine) of bilinearly upsampled, unit embeddings."""

    def predict(params, images):
        f = _normalize(embed(params, images).astype(jnp.float32))
        f = image_ops.resize_bilinear(f, images.shape[1:3], align_corners=False)
        return {"labels": {"cluster": jnp.argmax(_normalize(f) @ centroids.T, axis=-1)}}

    return predict


def unit_embedding_program(embed):
    """The jitted (params, images) -> unit embeddings (B, h, w, D), float32, of `embed`."""

    @xla.jit
    def features(params, images):
        return _normalize(embed(params, images).astype(jnp.float32))

    return features


def sample_embeddings(embed, params, loader, *, seed: int, points_per_image: int) -> np.ndarray:
    """Unit embeddings of up to points_per_image random grid pixels of each valid image."""
    features = unit_embedding_program(embed)
    rng = np.random.default_rng(seed)
    picked = []
    for batch in loader:
        f = np.asarray(features(params, np.asarray(batch["image"])))
        f = f[np.asarray(batch["valid"], bool)].reshape(-1, f.shape[-1])
        take = min(points_per_image * len(batch["image"]), len(f))
        picked.append(f[rng.choice(len(f), take, replace=False)])
    return np.concatenate(picked) if picked else np.zeros((0, 1), np.float32)


def evaluate_kmeans(
    embed,
    params,
    n_classes: int,
    loader,
    *,
    seed: int = 0,
    mesh=None,
    points_per_image: int = 64,
) -> dict:
    """Clusters embeddings of the split into n_classes, scored with Hungarian matching.

    `embed(params, images)` maps uint8 images (B,H,W,3) to (B,h,w,D) (`backbone_embedding`,
    `code_embedding`). Cosine k-means is fitted on a random subset of grid pixels, then
    every label pixel is assigned via bilinearly upsampled embeddings and scored by the one
    evaluator: its result dict, with "cluster".
    """
    if jax.process_count() > 1:
        raise ValueError("the k-means baseline runs in single-process runs only (the demo)")
    points = sample_embeddings(embed, params, loader, seed=seed, points_per_image=points_per_image)
    if len(points) == 0:
        raise ValueError("k-means baseline: the evaluation split is empty")
    centroids = fit_spherical_kmeans(jax.random.key(seed), jnp.asarray(points), n_classes)
    scorer = evaluator.Evaluator(
        kmeans_predictor(embed, centroids), n_classes, mesh, progress=False
    )
    return scorer(params, loader)
