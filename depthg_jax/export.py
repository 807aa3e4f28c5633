"""Export a training run: `python -m depthg_jax.export --workdir=W --out=DIR
[--step=N | --best] [--member=NAME] [--format=checkpoint|portable]`.

Writes a self-contained inference export (backbone + head + probes + config) from the latest
(or `--step`, or the best validated) checkpoint of a single run or a sweep, reading the run's
own config and checkpoint layout (depthg_jax.training.exports). For a sweep it writes the best
member by default and any member with `--member=NAME` (a name or an index of the member table
in W/sweep_members.json).

`--format=portable` writes a portable inference artifact instead (runtime/portable.py): the
whole inference function (uint8 images in; cluster ids, class ids and the code out) serialised
with jax.export for cpu, cuda and tpu, at the evaluation resolution (`--res` to choose
another) with the flip average baked in (`--noflip` leaves it out), which runs with only jax,
numpy and flatbuffers installed (README, section "Portable inference").
`python -m depthg_jax.export --export=DIR --format=portable --out=OUT` writes it from an
existing export instead of a workdir.

`python -m depthg_jax.export --verify=DIR` checks an export, a portable artifact or a training
checkpoint step (W/checkpoints/N) against its manifest of checksums and names any altered or
missing file.
"""

from __future__ import annotations

import os

from absl import app, flags

FLAGS = flags.FLAGS
FORMATS = ("checkpoint", "portable")  # training.exports.FORMATS, without importing JAX here


def verify(directory: str) -> str:
    """Verifies an export, portable artifact or checkpoint step; returns a one-line account."""
    from depthg_jax.runtime import checkpoint, integrity, portable

    if os.path.isfile(os.path.join(directory, "config.json")):
        n = checkpoint.verify_export(directory)
        return f"{directory}: export intact ({n} files match their checksums)"
    if portable.is_portable(directory):
        sidecar = portable.verify_portable(directory)
        platforms = ", ".join(sidecar["platforms"])
        return f"{directory}: portable artifact intact (for {platforms}; its files match)"
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
    flags.DEFINE_enum(
        "format", "checkpoint", list(FORMATS),
        "checkpoint: an export for evaluate and segment; portable: the inference function "
        "serialised with jax.export for cpu, cuda and tpu (runs without depthg_jax).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "export", None, "With --format=portable: an existing export to convert (instead of "
        "--workdir).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer(
        "res", None, "With --format=portable: the fixed input side in px (default: the "
        "config's data.eval_res).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool(
        "flip", True, "With --format=portable: bake in the flip average of the code "
        "(--noflip: one pass).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "verify",
        None,
        "Only check this export, portable artifact or checkpoint step directory.",
        flag_values=fv,
    )


def run(fv: flags.FlagValues = FLAGS) -> int:
    """Exports (or verifies) as the flags say; returns the exit status."""
    if fv.verify:
        print(verify(fv.verify))
        return 0
    portable = fv.format == "portable"
    if not portable and (fv.res is not None or not fv.flip):
        raise app.UsageError("--res and --noflip apply to --format=portable only")
    from depthg_jax.training import exports

    if fv.export:
        if not portable:
            raise app.UsageError("--export=DIR is already an export: add --format=portable")
        if fv.workdir or fv.step is not None or fv.best or fv.member:
            raise app.UsageError(
                "--export=DIR converts that export: --workdir, --step, --best and --member "
                "pick a checkpoint of a run instead; give one or the other"
            )
        if not fv.out:
            raise app.UsageError("--out is required")
        sidecar = exports.portable_from_export(fv.export, fv.out, res=fv.res, flip=fv.flip)
        print(_portable_line(fv.export, fv.out, sidecar))
        return 0
    if not fv.workdir or not fv.out:
        raise app.UsageError("--workdir and --out are required (or --verify=DIR)")
    if fv.step is not None and fv.best:
        raise app.UsageError("--step and --best pick the checkpoint two ways: give one")
    selection = exports.export_run(
        fv.workdir, fv.out, step=fv.step, best=fv.best, member=fv.member,
        format=fv.format, res=fv.res, flip=fv.flip,
    )  # fmt: skip
    member = f" (member {selection['member']})" if "member" in selection else ""
    what = "a portable artifact" if portable else "an export"
    print(f"Exported step {selection['step']}{member} of {fv.workdir} as {what} to {fv.out}")
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(FLAGS)


def _portable_line(source: str, out: str, sidecar: dict) -> str:
    res, flip = sidecar["resolution"], " with flip" if sidecar["flip"] else ""
    platforms = ", ".join(sidecar["platforms"])
    return (
        f"Wrote the portable artifact of {source} to {out}: {res} x {res} px{flip}, for {platforms}"
    )


if __name__ == "__main__":
    define_flags()
    from depthg_jax import commands

    commands.run_main(main)
