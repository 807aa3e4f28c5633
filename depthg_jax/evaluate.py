"""`python -m depthg_jax.evaluate --checkpoint=DIR [--config=FILE] [--out=DIR]`: the paper's
protocol on an export (depthg_jax.evaluation.evaluator), with its report.

The export is loaded through the inference API (`inference.Segmenter`), and the evaluation
split's labels are read once before any work (`data.label_check`): an id >= data.n_classes,
or label files that are all ignore, are errors naming the files. Then:
- with labelled images, the protocol scores them (only those: the report says how many of the
  split's images that was) and writes results.json ("kind": "evaluation report"), the
  per-class IoU table and the confusion pictures;
- without a single labelled pixel, no score is possible: it writes the cluster maps of the
  evaluation crops (clusters/<id>.png, ids as 8-bit grey), the cluster usage (results.json,
  cluster_usage.png) and a picture sheet (sheet.png: image | clusters), says so and exits 0.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from depthg_jax import commands, inference
from depthg_jax import config as config_lib
from depthg_jax.data import label_check, palette, pipeline, transforms
from depthg_jax.evaluation import reports
from depthg_jax.evaluation.evaluator import evaluate_loader
from depthg_jax.runtime import checkpoint, distributed, files, sharding

SHEET_IMAGES = 16

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

    Returns (results, class names, written paths, the export's selection record or None);
    results without scores (only "usage") when the split has no labelled pixel.
    """
    out_dir = out_dir or os.path.join(checkpoint_dir, "eval")
    if jax.process_index() == 0:
        files.check_writable(out_dir)  # before minutes of evaluation, not after
    loaded = inference.Segmenter.load(checkpoint_dir)
    config, selection = loaded.config, checkpoint.load_selection(checkpoint_dir)
    if config_override is not None:
        check_model_matches(config, config_override)
        config.data = config_override.data
        config.eval = config_override.eval
    eval_data = config_lib.eval_data(config)
    depth_cast = config_lib.release_depth_cast(config, eval_data.name)
    source = pipeline.make_source(
        eval_data, eval_data.eval_split, release_depth_cast=depth_cast, role="eval"
    )
    where = f"the evaluation split {eval_data.eval_split!r} of {eval_data.name} at " + (
        eval_data.root or eval_data.data_dir
    )
    scan = label_check.scan_split(source, config.data.n_classes)
    label_check.require_usable(scan, where, "Remove those label files to evaluate without labels.")
    seg = inference.Segmenter(
        config, loaded.params, crf=config.eval.crf, res=config.data.eval_res,
        batch_size=config.eval.batch_size, flip=config.eval.flip,
    )  # fmt: skip
    names = palette.class_names(eval_data.name, config.data.n_classes)
    if not scan["usable"]:
        results, paths = evaluate_without_labels(seg, source, out_dir, max_batches)
        results.update(checkpoint=selection, split=where)
        sheet = results.pop("sheet")
        if jax.process_index() == 0:
            colours = palette.palette_for(config.data.name, seg.n_classes)
            clusters = [f"cluster_{i}" for i in range(seg.n_classes)]
            paths.update(
                reports.write_label_free_report(results, clusters, colours, sheet, out_dir)
            )
        return results, names, paths, selection
    mesh = sharding.mesh_for(config)  # the export's mesh.model: its backbone split as trained
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    loader = pipeline.make_eval_loader(
        eval_data,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_batches=max_batches,
        release_depth_cast=depth_cast,
    )
    results = evaluate_loader(
        seg.params,
        seg.spec,
        loader,
        flip=seg.flip,
        crf=config.eval.crf,
        mesh=mesh,
        crf_image=config.eval.get("crf_image", "exact"),
    )
    results["checkpoint"] = selection
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


def eval_crop(image: np.ndarray, res: int) -> np.ndarray:
    """The evaluation transform of an image alone (resize shorter side, centre crop; nearest)."""
    rows, cols = transforms.compute_resize_crop_indices(*image.shape[:2], res)
    return image[rows][:, cols]


def evaluate_without_labels(seg: inference.Segmenter, source, out_dir: str, max_batches: int):
    """Cluster maps of every evaluation crop of this process's share (every process_count-th
    image), their cluster usage (summed over processes) and a picture sheet (process 0).
    Reads images only: no depth or labels are needed."""
    start = time.perf_counter()
    count = len(source)
    if max_batches:
        count = min(count, max_batches * seg.batch_size)
    mine = list(range(jax.process_index(), count, jax.process_count()))
    records = getattr(source, "records", None)

    def crops():
        for i in mine:
            image = source.read_image_fn(records[i].image) if records else source[i]["image"]
            yield eval_crop(image, seg.res)

    n = seg.n_classes
    usage = {"cluster": np.zeros(n, np.int64)}
    if seg.crf:
        usage["cluster_crf"] = np.zeros(n, np.int64)
    colours = palette.palette_for(seg.config.data.name, n)
    rows, paths = [], {"cluster_maps": os.path.join(out_dir, "clusters")}
    for i, result in zip(mine, seg.predict_stream(crops()), strict=True):
        usage["cluster"] += np.bincount(result.probs.argmax(-1).ravel(), minlength=n)
        if seg.crf:
            usage["cluster_crf"] += np.bincount(result.labels.ravel(), minlength=n)
        name = f"{source.ids[i]}.png"
        files.save_image_atomic(
            os.path.join(paths["cluster_maps"], name), result.labels.astype(np.uint8)
        )
        if len(rows) < SHEET_IMAGES:
            rows.append((result.image, palette.colorize(result.labels, colours)))
    seg.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        for key, counts in usage.items():
            usage[key] = multihost_utils.process_allgather(counts).sum(0)
    total = count if jax.process_count() > 1 else len(mine)
    results = {
        "usage": usage,
        "num_images": total,
        "num_labelled_images": 0,
        "time_s": time.perf_counter() - start,
        "crf_time_s": 0.0,
        "sheet": reports.make_sheet(rows) if rows else None,
    }
    return results, paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint=DIR is required (an export directory)")
    distributed.initialize()
    results, names, paths, selection = run(
        FLAGS.checkpoint, FLAGS.config, FLAGS.out, FLAGS.max_batches
    )
    if jax.process_index() == 0:
        print(reports.describe_checkpoint(FLAGS.checkpoint, selection))
        print(describe(results, names))
        for what, path in paths.items():
            print(f"wrote {what}: {path}")


def describe(results: dict, names: list[str]) -> str:
    """What evaluate prints: the scores and over how many images, or why there are none."""
    if "cluster" not in results:
        key = "cluster_crf" if "cluster_crf" in results["usage"] else "cluster"
        n = len(results["usage"][key])
        after = " after the CRF" if key == "cluster_crf" else ""
        return (
            f"No scores are possible: {results['split']} has no labels "
            f"({results['num_images']} images). Cluster usage{after}:\n"
            + reports.format_usage(results["usage"][key], [f"cluster_{i}" for i in range(n)])
        )
    lines = []
    labelled, total = results["num_labelled_images"], results["num_images"]
    if labelled < total:
        lines.append(
            f"Scored over the {labelled} of {total} images with labels "
            f"({total - labelled} have no labelled pixel)"
        )
    lines += [reports.format_table(results), "", reports.format_class_table(results, names)]
    return "\n".join(lines)


if __name__ == "__main__":
    define_flags()
    commands.run_main(main)
