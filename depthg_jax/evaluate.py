"""`python -m depthg_jax.evaluate --checkpoint=DIR [--config=FILE] [--out=DIR]`: the paper's
protocol on an export (depthg_jax.evaluation.evaluator), with its report."""

from __future__ import annotations

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from depthg_jax import commands
from depthg_jax import config as config_lib
from depthg_jax.data import palette, pipeline
from depthg_jax.evaluation import reports
from depthg_jax.evaluation.evaluator import evaluate_loader
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, distributed, files, sharding

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
        files.check_writable(out_dir)  # before minutes of evaluation, not after
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
        model_lib.ModelSpec.from_config(config),
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
        print(reports.format_table(results))
        print()
        print(reports.format_class_table(results, names))
        for what, path in paths.items():
            print(f"wrote {what}: {path}")


if __name__ == "__main__":
    define_flags()
    commands.run_main(main)
