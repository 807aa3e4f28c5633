"""Entry point: `python -m depthg_jax.main --config=configs/coco.py --workdir=DIR`.

Parses flags, initialises multi-host JAX when several processes run, and hands over to
`training.trainer.train_and_evaluate`, or to `training.population.train_and_evaluate` when
config.sweep names a population of members. Override any config field with
`--config.section.field=value`.
"""

from absl import app, flags
from ml_collections import config_flags

from depthg_jax import commands
from depthg_jax.runtime import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, pictures and the export.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize()
    # After initialize(): importing these must not start backends.
    from depthg_jax.training import population, sweep, trainer

    print(distributed.describe(), flush=True)
    if sweep.is_sweep(FLAGS.config):  # config.sweep names a population
        population.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    commands.run_main(main)
