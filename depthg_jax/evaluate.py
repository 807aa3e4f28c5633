"""Evaluation: the paper's protocol (docs/evaluation.md) over a whole split, and its report.

`python -m depthg_jax.evaluate --checkpoint=DIR [--config=FILE] [--out=DIR]` loads an export
(`depthg_jax.checkpoint.save_export`), runs the final protocol (320 centre crop, flip-averaged
code, upsampled, dense CRF, argmax) and writes results.json, a per-class IoU table and the
cluster probe's confusion-matrix picture. `evaluate_loader` is also the trainer's validation.

Confusion counts accumulate on device (int32: fine below 2^31 pixels per cell, i.e. > 20k
images of 320 x 320). The CRF runs on the host's cores in a process pool; its labels go back
through the same on-device counting, so multi-host runs need no special path.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from depthg_jax import checkpoint, distributed, image_ops, metrics, reports, sharding, xla
from depthg_jax import config as config_lib
from depthg_jax import crf as crf_lib
from depthg_jax.data import palette, pipeline
from depthg_jax.models import model as model_lib

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


# --- Command line ------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the trainer imports this module)."""
    flags.DEFINE_string("checkpoint", None, "An export directory (python -m depthg_jax.export).")
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Optional config file whose data and eval sections replace the checkpoint's "
        "(override fields with --config.data.root=...). The model always comes from the "
        "checkpoint.",
        lock_config=True,
    )
    flags.DEFINE_string("out", None, "Output directory (default: <checkpoint>/eval).")
    flags.DEFINE_integer("max_batches", 0, "Stop after this many batches (0: the whole split).")
    distributed.define_flags()


def check_model_matches(checkpoint_cfg, other_cfg) -> None:
    """Raises if a config disagrees with the checkpoint's model (variant, dim, classes)."""
    pairs = [
        ("model.variant", checkpoint_cfg.model.variant, other_cfg.model.variant),
        ("model.dim", checkpoint_cfg.model.dim, other_cfg.model.dim),
        ("data.n_classes", checkpoint_cfg.data.n_classes, other_cfg.data.n_classes),
    ]
    bad = [f"{name}: checkpoint {a!r}, config {b!r}" for name, a, b in pairs if a != b]
    if bad:
        raise ValueError(
            "the checkpoint was trained with another model than --config describes: "
            + "; ".join(bad)
        )


def run(checkpoint_dir: str, config_override=None, out_dir: str | None = None, max_batches=0):
    """Loads an export, evaluates it on its config's eval split, writes the report.

    Returns (results, class names, written paths, the export's selection record or None).
    """
    out_dir = out_dir or os.path.join(checkpoint_dir, "eval")
    if jax.process_index() == 0:
        check_writable(out_dir)  # before minutes of evaluation, not after
    config, params = checkpoint.load_export(checkpoint_dir)
    selection = checkpoint.load_selection(checkpoint_dir)
    if config_override is not None:
        check_model_matches(config, config_override)
        config.data = config_override.data
        config.eval = config_override.eval
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    eval_data = config_lib.eval_data(config)
    loader = pipeline.make_eval_loader(
        eval_data,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_batches=max_batches,
        release_depth_cast=config_lib.release_depth_cast(config, eval_data.name),
    )
    results = evaluate_loader(
        params,
        config.model,
        config.data.n_classes,
        loader,
        flip=config.eval.flip,
        crf=config.eval.crf,
        mesh=mesh,
        crf_image=config.eval.get("crf_image", "exact"),
    )
    results["checkpoint"] = selection
    names = palette.class_names(eval_data.name, config.data.n_classes)
    paths = {}
    if jax.process_index() == 0:
        try:
            paths = reports.write_report(results, names, out_dir)
        except OSError as e:
            # The scores are never lost: print them, then fail on the report.
            print(reports.format_table(results), flush=True)
            raise OSError(e.errno, f"could not write the report to {out_dir} ({e}); the "
                          "scores are printed above") from e  # fmt: skip
    return results, names, paths, selection


def check_writable(out_dir: str) -> None:
    """Creates out_dir and writes a probe file there; OSError naming the folder otherwise."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"--out={out_dir} is not writable ({e.strerror})") from e


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO.
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint=DIR is required (an export directory)")
    distributed.initialize()
    try:
        results, names, paths, selection = run(
            FLAGS.checkpoint, FLAGS.config, FLAGS.out, FLAGS.max_batches
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(reports.describe_checkpoint(FLAGS.checkpoint, selection))
        print(reports.format_table(results))
        print()
        print(reports.format_class_table(results, names))
        for what, path in paths.items():
            print(f"wrote {what}: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
