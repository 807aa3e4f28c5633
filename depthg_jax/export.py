"""Export a training run: `python -m depthg_jax.export --workdir=W --out=DIR [--step=N|--best]`.

`python -m depthg_jax.export --verify=DIR` checks an export, or a training checkpoint step
(W/checkpoints/N), against its manifest of checksums and names any altered or missing file.

Writes a self-contained inference checkpoint (backbone + head + probes + config) from the
latest (or `--step`, or the best validated) training checkpoint in W, loading the backbone the
run's config names.
"""

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags

from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, seeds

FLAGS = flags.FLAGS


def export_run(workdir: str, out: str, step: int | None = None, *, best: bool = False) -> int:
    """Exports the run in `workdir` to `out`; returns the exported step."""
    from depthg_jax.training import train

    config_file = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: is {workdir} a training workdir?")
    with open(config_file) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = model_lib.build_model(config.model, config.data.n_classes)
    k_backbone, k_state, _ = seeds.run_keys(config.seed)
    state = train.create_train_state(config, model, k_state)
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"),
        keep=config.train.keep_checkpoints,
        save_every=1,
        best_metric=config.train.best_metric,
    )
    selection = None
    if best:
        selection = checkpoint.best_selection(manager, config.train.best_metric)
        if selection is None:
            raise FileNotFoundError(
                f"{workdir}/checkpoints has no validated checkpoint to pick the best from "
                f"(none carries {config.train.best_metric}; train.eval_every was 0 or no "
                "validation ran yet): export the latest with --step or without --best"
            )
        step = selection["step"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpoint.restore_train_state(manager, abstract, step)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state, _, step = restored
    if selection is None:
        selection = {"checkpoint": "step", "step": int(step)}
    backbone = model_lib.init_backbone(config.model, k_backbone)
    checkpoint.save_export(
        out,
        config,
        model_lib.full_params(backbone, jax.device_get(state.params)),
        selection=selection,
    )
    return step


def verify(directory: str) -> str:
    """Verifies an export or checkpoint step directory; returns a one-line account."""
    from depthg_jax.runtime import integrity

    if os.path.isfile(os.path.join(directory, "config.json")):
        n = checkpoint.verify_export(directory)
        return f"{directory}: export intact ({n} files match their checksums)"
    n = integrity.verify_manifest(directory)
    return f"{directory}: intact ({n} files match their checksums)"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.verify:
        try:
            print(verify(FLAGS.verify))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required (or --verify=DIR)")
    try:
        step = export_run(FLAGS.workdir, FLAGS.out, FLAGS.step, best=FLAGS.best)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"Exported step {step} of {FLAGS.workdir} to {FLAGS.out}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training run's workdir.")
    flags.DEFINE_string("out", None, "Directory to create (must not exist).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_bool("best", False, "Export the best validated checkpoint (train.best_metric).")
    flags.DEFINE_string("verify", None, "Only check this export or checkpoint step directory.")
    app.run(main)
