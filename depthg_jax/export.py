"""Export a training run: `python -m depthg_jax.export --workdir=W --out=DIR`.

Writes a self-contained inference checkpoint (backbone + head + probes + config) from the
latest (or `--step`) training checkpoint in W, loading the backbone the run's config names.
"""

import json
import os

import jax
import ml_collections
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir.")
flags.DEFINE_string("out", None, "Directory to create (must not exist).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "out"])


def export_run(workdir: str, out: str, step: int | None = None) -> int:
    """Exports the run in `workdir` to `out`; returns the exported step."""
    from depthg_jax import checkpoint, train

    config_file = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: is {workdir} a training workdir?")
    with open(config_file) as f:
        config = ml_collections.ConfigDict(json.load(f))
    models = train.build_models(config)
    k_backbone, k_state, _ = train.run_keys(config)
    state = train.create_train_state(config, models, k_state)
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints, save_every=1
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpoint.restore_train_state(manager, abstract, step)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state, _, step = restored
    backbone = train.init_backbone(config, models, k_backbone)
    checkpoint.save_export(out, config, {"backbone": backbone, **jax.device_get(state.params)})
    return step


def main(argv):
    del argv
    step = export_run(FLAGS.workdir, FLAGS.out, FLAGS.step)
    print(f"Exported step {step} of {FLAGS.workdir} to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
