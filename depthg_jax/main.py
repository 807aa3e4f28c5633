"""Entry point: `python -m depthg_jax.main --config=configs/coco.py --workdir=DIR`.

Parses flags, initialises multi-host JAX when several processes run, and hands over to
`train.train_and_evaluate`. Override any config field with `--config.section.field=value`.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, pictures and the export.")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host runs outside TPU/SLURM)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods)."
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Joins the other processes of a multi-host run (a no-op for a single process)."""
    if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO.
    initialize_distributed()
    from depthg_jax import train

    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices "
        f"({jax.devices()[0].platform})",
        flush=True,
    )
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
