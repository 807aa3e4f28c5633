"""Export a training run: `python -m depthg_jax.export --workdir=W --out=DIR
[--step=N | --best] [--member=NAME]`.

Writes a self-contained inference export (backbone + head + probes + config) from the latest
(or `--step`, or the best validated) checkpoint of a single run or a sweep, reading the run's
own config and checkpoint layout (depthg_jax.training.exports). For a sweep it writes the best
member by default and any member with `--member=NAME` (a name or an index of the member table
in W/sweep_members.json).

`python -m depthg_jax.export --verify=DIR` checks an export, or a training checkpoint step
(W/checkpoints/N), against its manifest of checksums and names any altered or missing file.
"""

from __future__ import annotations

import os

from absl import app, flags

FLAGS = flags.FLAGS


def verify(directory: str) -> str:
    """Verifies an export or checkpoint step directory; returns a one-line account."""
    from depthg_jax.runtime import checkpoint, integrity

    if os.path.isfile(os.path.join(directory, "config.json")):
        n = checkpoint.verify_export(directory)
        return f"{directory}: export intact ({n} files match their checksums)"
    n = integrity.verify_manifest(directory)
    return f"{directory}: intact ({n} files match their checksums)"


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "Directory to create (must not exist).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_bool(
        "best", False, "Export the best validated checkpoint (train.best_metric).", flag_values=fv
    )
    flags.DEFINE_string(
        "member", None, "A sweep's member, by name or index (default: the best).", flag_values=fv
    )
    flags.DEFINE_string(
        "verify", None, "Only check this export or checkpoint step directory.", flag_values=fv
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.verify:
        print(verify(FLAGS.verify))
        return
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required (or --verify=DIR)")
    if FLAGS.step is not None and FLAGS.best:
        raise app.UsageError("--step and --best pick the checkpoint two ways: give one")
    from depthg_jax.training import exports

    selection = exports.export_run(
        FLAGS.workdir, FLAGS.out, step=FLAGS.step, best=FLAGS.best, member=FLAGS.member
    )
    member = f" (member {selection['member']})" if "member" in selection else ""
    print(f"Exported step {selection['step']}{member} of {FLAGS.workdir} to {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    from depthg_jax import commands

    commands.run_main(main)
