"""Evaluation: the paper's protocol (docs/evaluation.md) over a whole split, and its report.

`evaluate_loader` runs the final protocol (320 centre crop, flip-averaged code, upsampled,
dense CRF, argmax) for `python -m depthg_jax.evaluate`, and is also the trainer's validation.

Confusion counts accumulate on device (int32: fine below 2^31 pixels per cell, i.e. > 20k
images of 320 x 320). The CRF runs on the host's cores in a process pool; its labels go back
through the same on-device counting, so multi-host runs need no special path.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax import config as config_lib
from depthg_jax.evaluation import crf as crf_lib
from depthg_jax.evaluation import metrics, reports
from depthg_jax.method import image_ops
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import sharding, xla

PROBES = reports.PROBES


@functools.lru_cache(maxsize=16)
def make_eval_step(
    variant: str,
    dim: int,
    dtype: str,
    n_classes: int,
    mesh,
    *,
    flip: bool,
    keep_outputs: bool,
    matmul_precision: str = "default",
):
    """A jitted step: batch -> (cluster confusion, linear confusion, #valid[, log-probs]).

    Cached, so repeated validations during training compile once.
    """
    replicated = sharding.replicated(mesh)
    batched = sharding.batch_sharding(mesh)
    out_shardings = (replicated, replicated, replicated)
    if keep_outputs:
        out_shardings += (batched, batched)

    @xla.jit(out_shardings=out_shardings)
    def step(params, images, labels, valid):
        out = model_lib.predict(
            params,
            images,
            variant=variant,
            dim=dim,
            n_classes=n_classes,
            dtype=dtype,
            flip=flip,
            matmul_precision=matmul_precision,
        )
        cluster = jnp.argmax(out["cluster_log_probs"], axis=-1)
        linear = jnp.argmax(out["linear_logits"], axis=-1)
        result = (
            metrics.confusion(cluster, labels, n_classes, n_classes, valid),
            metrics.confusion(linear, labels, n_classes, n_classes, valid),
            jnp.sum(valid.astype(jnp.int32)),
        )
        if keep_outputs:
            result += (out["cluster_log_probs"], jax.nn.log_softmax(out["linear_logits"]))
        return result

    return step


@functools.lru_cache(maxsize=16)
def make_count_step(n_classes: int, mesh):
    """A jitted step counting already-made predictions (the CRF's) on device."""

    @xla.jit(out_shardings=sharding.replicated(mesh))
    def count(cluster, linear, labels, valid):
        return (
            metrics.confusion(cluster, labels, n_classes, n_classes, valid),
            metrics.confusion(linear, labels, n_classes, n_classes, valid),
        )

    return count


def evaluate_loader(
    params: dict,
    model_cfg,
    n_classes: int,
    loader,
    *,
    flip: bool,
    crf: bool,
    mesh=None,
    progress: bool = True,
    crf_pool=None,
    crf_image: str = "exact",
) -> dict:
    """Scores both probes over every batch of `loader` (the whole split).

    Args:
      params: {"backbone", "head", "cluster_probe", "linear_probe"} flax params.
      model_cfg: has .variant, .dim, .dtype (config.model).
      n_classes: ground-truth classes = clusters = linear probe outputs.
      loader: iterable of host-local batches {"image" uint8 (b,E,E,3), "label" int32 (b,E,E)
        with -1 ignored, "valid" bool (b,)} (depthg_jax.data.pipeline.make_eval_loader).
      flip: average the code with the flipped image's flipped code.
      crf: also score dense-CRF-refined predictions (host, in parallel).
      mesh: 1-D ('data',) mesh (default: all devices).
      progress: show a tqdm bar (process 0).
      crf_pool: executor for the CRF (default: one made here with a worker per core).
      crf_image: the CRF's RGB input: "exact" (the uint8 image) or "reference" (the release's
        floor(255 * unnormalised image), `image_ops.release_crf_image`).
    Returns:
      {"cluster", "linear"[, "cluster_crf", "linear_crf"]}: metrics.scores dicts (the cluster
      probe Hungarian-matched, the linear probe identity); "confusion": the raw counts per key;
      "num_images"; "time_s" (whole pass) and "crf_time_s" (of it, in the CRF).
    """
    from tqdm import tqdm

    mesh = sharding.make_mesh() if mesh is None else mesh
    params = sharding.ensure_replicated(params, mesh)
    step = make_eval_step(
        model_cfg.variant,
        int(model_cfg.dim),
        str(model_cfg.dtype),
        int(n_classes),
        mesh,
        flip=bool(flip),
        keep_outputs=bool(crf),
        matmul_precision=model_cfg.get("matmul_precision", "default"),
    )
    if crf_image not in config_lib.CRF_IMAGES:
        raise ValueError(f"crf_image={crf_image!r}; expected one of {config_lib.CRF_IMAGES}")
    count = make_count_step(n_classes, mesh) if crf else None
    own_pool = crf and crf_pool is None
    pool = crf_lib.make_crf_pool() if own_pool else crf_pool
    keys = PROBES + tuple(f"{p}_crf" for p in PROBES) if crf else PROBES
    totals = {k: None for k in keys + ("num_images",)}
    crf_time = 0.0
    start = time.perf_counter()
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(
        loader,
        total=total,
        desc="evaluate",
        unit="batch",
        disable=not progress or jax.process_index() != 0,
        dynamic_ncols=True,
    )

    def add(key, value):
        totals[key] = value if totals[key] is None else totals[key] + value

    try:
        for batch in bar:
            batch = {k: batch[k] for k in ("image", "label", "valid")}
            g = sharding.host_to_global(batch, mesh)
            outs = step(params, g["image"], g["label"], g["valid"])
            add("cluster", outs[0])
            add("linear", outs[1])
            add("num_images", outs[2])  # kept on device: no host sync per batch
            if crf:
                images = np.asarray(batch["image"])
                if crf_image == "reference":
                    images = image_ops.release_crf_image(images)
                valid = np.asarray(batch["valid"], bool)
                scores = [sharding.local_rows(outs[3])[valid], sharding.local_rows(outs[4])[valid]]
                t0 = time.perf_counter()
                # Both probes' images in one call keeps every worker busy to the end.
                refined = [np.zeros(images.shape[:3], np.int32) for _ in PROBES]
                if valid.any():
                    both = crf_lib.dense_crf_batch(
                        np.concatenate([images[valid]] * 2), np.concatenate(scores), pool
                    )
                    refined[0][valid], refined[1][valid] = np.split(both, 2)
                crf_time += time.perf_counter() - t0
                g2 = sharding.host_to_global(
                    {"c": refined[0], "l": refined[1], "label": batch["label"], "valid": valid},
                    mesh,
                )
                c_crf, l_crf = count(g2["c"], g2["l"], g2["label"], g2["valid"])
                add("cluster_crf", c_crf)
                add("linear_crf", l_crf)
    finally:
        bar.close()
        if own_pool:
            pool.shutdown()
    num_images = 0 if totals["num_images"] is None else int(totals["num_images"])
    if num_images == 0:
        raise ValueError("the evaluation loader gave no valid images (empty split?)")
    confusions = {k: np.asarray(jax.device_get(v)).astype(np.int64) for k, v in totals.items()}
    results = {k: metrics.scores(confusions[k], hungarian=k.startswith("cluster")) for k in keys}
    results["confusion"] = confusions
    results["num_images"] = num_images
    results["time_s"] = time.perf_counter() - start
    results["crf_time_s"] = crf_time
    return results
