"""The one evaluator: a predict function and a loader in, confusion matrices and scores out.

An `Evaluator` is built once from a predict function and reused: it jits one step that runs
the predictions and counts (prediction, label) pairs on device, and one loop that feeds it
every batch of a loader. Whoever is being scored provides the predict function
(`head_predictor`: one head, the paper's protocol; `population_predictor`: every member of a
population from one backbone pass; baselines.kmeans_predictor: k-means on features), so the
evaluator never imports the trainer.

A predict function maps (params, uint8 images (B, H, W, 3)) to
  {"labels": {probe: int ids (..., B, H, W)}, "log_probs": {probe: (B, H, W, n)}}
with probe names "cluster" (Hungarian-matched) or "linear" (identity); leading axes before B
(a population's members) give one confusion matrix per index. "log_probs" is needed only for
the dense CRF (`crf=True`): the CRF runs on the host's cores in a process pool and its labels
go back through the same on-device counting, so multi-host runs need no special path.

Confusion counts accumulate on device (int32: fine below 2^31 pixels per cell, i.e. > 20k
images of 320 x 320) and are fetched once at the end. Beside them, usage counts (how many
pixels of the valid images each prediction id was given, labels or not) say how a head uses
its clusters, which is all there is to say about unlabelled data: a split without a single
labelled pixel gives usage and no scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax import config as config_lib
from depthg_jax.evaluation import crf as crf_lib
from depthg_jax.evaluation import metrics
from depthg_jax.method import image_ops
from depthg_jax.models import model as model_lib
from depthg_jax.models import partitioning
from depthg_jax.runtime import sharding, xla

PROBES = ("cluster", "linear")
PredictFn = Callable[[dict, jax.Array], dict]


def head_predictor(spec: model_lib.ModelSpec, *, flip: bool) -> PredictFn:
    """One trained head (params {"backbone", "head", "cluster_probe", "linear_probe"})."""

    def predict(params, images):
        out = model_lib.predict(params, images, spec, flip)
        return {
            "labels": {
                "cluster": jnp.argmax(out["cluster_log_probs"], axis=-1),
                "linear": jnp.argmax(out["linear_logits"], axis=-1),
            },
            "log_probs": {
                "cluster": out["cluster_log_probs"],
                "linear": jax.nn.log_softmax(out["linear_logits"]),
            },
        }

    return predict


def population_predictor(spec: model_lib.ModelSpec, *, flip: bool = False) -> PredictFn:
    """Every member of a population: params {"backbone", and each trainable part with a
    leading member axis P}; one backbone pass, then the heads and probes member by member
    (memory of one member's upsampled code at a time). Labels (P, B, H, W)."""

    def predict(params, images):
        feats = model_lib.features_for_predict(spec, params["backbone"], images, flip=flip)
        trainable = {k: params[k] for k in model_lib.TRAINABLE_KEYS}

        def member(p):
            out = model_lib.predict_from_features(spec, p, feats, images.shape[1:3], flip=flip)
            return (
                jnp.argmax(out["cluster_log_probs"], axis=-1),
                jnp.argmax(out["linear_logits"], axis=-1),
            )

        cluster, linear = jax.lax.map(member, trainable)
        return {"labels": {"cluster": cluster, "linear": linear}}

    return predict


def _counts(preds: jax.Array, labels: jax.Array, valid: jax.Array, n: int) -> jax.Array:
    """Confusion of ids with any leading axes before the batch's: (..., n, n)."""
    count = lambda p: metrics.confusion(p, labels, n, n, valid)  # noqa: E731
    for _ in range(preds.ndim - labels.ndim):
        count = jax.vmap(count)
    return count(preds)


def _usage(preds: jax.Array, valid: jax.Array, n: int) -> jax.Array:
    """Pixels given each id over the valid images, leading axes before (B, H, W) kept: (..., n)."""

    def count(p):
        keep = valid.astype(bool)[:, None, None] & (p >= 0) & (p < n)
        ids = jnp.where(keep, p, 0).reshape(-1)
        return jnp.bincount(ids, keep.reshape(-1).astype(jnp.int32), length=n)

    for _ in range(preds.ndim - 3):
        count = jax.vmap(count)
    return count(preds).astype(jnp.int32)


def _labelled(labels: jax.Array, valid: jax.Array, n: int) -> jax.Array:
    """Valid images with at least one labelled pixel."""
    has = ((labels >= 0) & (labels < n)).reshape(labels.shape[0], -1).any(axis=1)
    return jnp.sum((has & valid.astype(bool)).astype(jnp.int32))


class Evaluator:
    """Scores a predict function over a loader (see the module docstring).

    Args:
      predict: the predict function; probe names from its "labels".
      n_classes: ground-truth classes = prediction ids.
      mesh: the ('data', 'model') mesh (runtime/sharding.py; default: all devices on
        'data'); batches split over 'data', the backbone over 'model'.
      crf: also score dense-CRF-refined predictions (host, in parallel).
      crf_image: the CRF's RGB input: "exact" (the uint8 image) or "reference" (the release's
        floor(255 * unnormalised image), `image_ops.release_crf_image`).
      progress: show a tqdm bar (process 0).
    """

    def __init__(
        self,
        predict: PredictFn,
        n_classes: int,
        mesh=None,
        *,
        crf: bool = False,
        crf_image: str = "exact",
        progress: bool = True,
        desc: str = "evaluate",
    ):
        if crf_image not in config_lib.CRF_IMAGES:
            raise ValueError(f"crf_image={crf_image!r}; expected one of {config_lib.CRF_IMAGES}")
        self.n_classes = int(n_classes)
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.crf, self.crf_image = bool(crf), crf_image
        self.progress, self.desc = progress, desc
        replicated = sharding.replicated(self.mesh)
        batched = sharding.batch_sharding(self.mesh)
        n = self.n_classes

        def tally(preds: dict, labels, valid) -> dict:
            return {
                "confusion": {k: _counts(v, labels, valid, n) for k, v in preds.items()},
                "usage": {k: _usage(v, valid, n) for k, v in preds.items()},
            }

        @xla.jit
        def step(params, images, labels, valid):
            out = predict(params, images)
            counts = tally(out["labels"], labels, valid)
            counts["num_images"] = jnp.sum(valid.astype(jnp.int32))
            counts["num_labelled_images"] = _labelled(labels, valid, n)
            counts = jax.lax.with_sharding_constraint(counts, replicated)
            if not self.crf:
                return (counts,)
            return counts, jax.lax.with_sharding_constraint(out["log_probs"], batched)

        @xla.jit(out_shardings=replicated)
        def count(preds, labels, valid):
            return tally(preds, labels, valid)

        self.step = step  # jitted (params, images, labels, valid): a batch's counts
        self.count = count  # jitted (labels by probe, labels, valid): counts of the CRF's labels

    def __call__(self, params: dict, loader, *, crf_pool=None):
        """Scores every batch of `loader` (host-local batches {"image" uint8 (b,E,E,3),
        "label" int32 (b,E,E) with -1 ignored, "valid" bool (b,)}, e.g.
        data.pipeline.make_eval_loader).

        Returns {probe[, probe_crf]: metrics.scores dict, "confusion": {key: int64 counts},
        "usage": {key: int64 (n,) pixels per predicted id}, "num_images", "num_labelled_images"
        (valid images with a labelled pixel), "time_s" (whole pass), "crf_time_s" (of it, in
        the CRF)}; without a single labelled pixel, the same without scores. Where the
        predictions carry a member axis, a list of such dicts, one per member.
        """
        from tqdm import tqdm

        # The backbone split over 'model' by the rules, the rest replicated; params already
        # on the mesh (the trainer's) stay where they are.
        params = partitioning.place_params(params, self.mesh)
        own_pool = self.crf and crf_pool is None
        pool = crf_lib.make_crf_pool() if own_pool else crf_pool
        totals: dict = {"confusion": {}, "usage": {}}
        crf_time = 0.0
        start = time.perf_counter()
        bar = tqdm(
            loader,
            total=len(loader) if hasattr(loader, "__len__") else None,
            desc=self.desc,
            unit="batch",
            disable=not self.progress or jax.process_index() != 0,
            dynamic_ncols=True,
        )

        def add(counts: dict, suffix: str = "") -> None:
            for what, value in counts.items():
                if isinstance(value, dict):
                    for k, v in value.items():
                        part = totals[what]
                        part[k + suffix] = v if k + suffix not in part else part[k + suffix] + v
                else:
                    totals[what] = value if what not in totals else totals[what] + value

        try:
            for batch in bar:
                batch = {k: batch[k] for k in ("image", "label", "valid")}
                g = sharding.host_to_global(batch, self.mesh)
                outs = self.step(params, g["image"], g["label"], g["valid"])
                add(outs[0])
                if self.crf:
                    t0 = time.perf_counter()
                    refined = self._refine(batch, outs[1], pool)
                    crf_time += time.perf_counter() - t0
                    g2 = sharding.host_to_global(
                        {**refined, "label": batch["label"], "valid": batch["valid"]}, self.mesh
                    )
                    add(self.count({k: g2[k] for k in refined}, g2["label"], g2["valid"]), "_crf")
        finally:
            bar.close()
            if own_pool:
                pool.shutdown()
        num_images = int(totals.get("num_images", 0))
        if num_images == 0:
            raise ValueError("the evaluation loader gave no valid images (empty split?)")
        fetched = jax.device_get({"confusion": totals["confusion"], "usage": totals["usage"]})
        confusions = {k: np.asarray(v).astype(np.int64) for k, v in fetched["confusion"].items()}
        usage = {k: np.asarray(v).astype(np.int64) for k, v in fetched["usage"].items()}
        common = {
            "num_images": num_images,
            "num_labelled_images": int(totals["num_labelled_images"]),
            "time_s": time.perf_counter() - start,
            "crf_time_s": crf_time,
        }

        def result(confusion: dict, used: dict) -> dict:
            labelled = next(iter(confusion.values())).sum() > 0
            scores = score(confusion) if labelled else {}
            return {**scores, "confusion": confusion, "usage": used, **common}

        members = next(iter(confusions.values())).shape[:-2]
        if not members:
            return result(confusions, usage)
        return [
            result({k: v[i] for k, v in confusions.items()}, {k: v[i] for k, v in usage.items()})
            for i in range(members[0])
        ]

    def _refine(self, batch: dict, log_probs: dict, pool) -> dict:
        """The dense CRF's labels of this host's valid images, per probe (0 where padded)."""
        images = np.asarray(batch["image"])
        if self.crf_image == "reference":
            images = image_ops.release_crf_image(images)
        valid = np.asarray(batch["valid"], bool)
        names = list(log_probs)
        refined = {k: np.zeros(images.shape[:3], np.int32) for k in names}
        if valid.any():
            scores = [sharding.local_rows(log_probs[k])[valid] for k in names]
            # Every probe's images in one call keeps every worker busy to the end.
            both = crf_lib.dense_crf_batch(
                np.concatenate([images[valid]] * len(names)), np.concatenate(scores), pool
            )
            for k, part in zip(names, np.split(both, len(names)), strict=True):
                refined[k][valid] = part
        return refined


def score(confusions: dict) -> dict:
    """metrics.scores of each confusion: Hungarian-matched for cluster probes, else identity."""
    return {k: metrics.scores(v, hungarian=k.startswith("cluster")) for k, v in confusions.items()}


def evaluate_loader(
    params: dict,
    spec: model_lib.ModelSpec,
    loader,
    *,
    flip: bool,
    crf: bool,
    mesh=None,
    progress: bool = True,
    crf_pool=None,
    crf_image: str = "exact",
) -> dict:
    """One head's scores over `loader`: Evaluator(head_predictor(spec, flip=flip)) once."""
    evaluator = Evaluator(
        head_predictor(spec, flip=flip),
        spec.n_classes,
        mesh,
        crf=crf,
        crf_image=crf_image,
        progress=progress,
    )
    return evaluator(params, loader, crf_pool=crf_pool)
