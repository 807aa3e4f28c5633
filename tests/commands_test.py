"""Every command answers --help with its own flags and exit status 0; known faults end in one
`error:` line (the traceback only with --verbose)."""

import subprocess
import sys

import pytest

from depthg_jax import commands

# Each command and flags its --help must list.
COMMANDS = {
    "depthg_jax.main": ["config", "workdir"],
    "depthg_jax.evaluate": ["checkpoint", "config", "out", "max_batches"],
    "depthg_jax.segment": ["checkpoint", "images", "out", "res", "batch_size", "probe"],
    "depthg_jax.export": ["workdir", "out", "step", "best", "member", "verify", "format", "export"],
    "depthg_jax.data.five_crop": ["dataset", "root", "out"],
    "depthg_jax.data.synthetic": ["out"],
    "depthg_jax.data.knn": ["config"],
    "depthg_jax.data.prepare": ["dataset", "data_dir"],
    "depthg_jax.data.depth": ["images", "out", "format", "device", "nearest_is", "batch_size"],
    "depthg_jax.models.convert": ["variant", "weights", "out"],
    "depthg_jax.models.release": ["checkpoint", "out"],
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_exits_0_and_lists_the_flags(module):
    for flag in ("--help", "-h"):
        out = subprocess.run(
            [sys.executable, "-m", module, flag], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        missing = [f for f in COMMANDS[module] if f"--{f}" not in out.stdout]
        assert not missing, (missing, out.stdout[-3000:])
        assert "absl.logging" not in out.stdout  # the command's flags, not absl's


def test_a_known_fault_is_one_error_line_and_verbose_adds_the_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    cmd = [
        sys.executable,
        "-m",
        "depthg_jax.export",
        f"--workdir={missing}",
        f"--out={tmp_path / 'o'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "config.json not found" in lines[-1]
    assert "Traceback" not in out.stderr
    verbose = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_run_with_own_flags_answers_help_and_reports_known_faults(capsys):
    def define(fv):
        from absl import flags

        flags.DEFINE_integer("size", 3, "A size.", flag_values=fv)

    def run(fv):
        raise ValueError(f"--size={fv.size} is wrong here")

    assert commands.run_with_own_flags("prog", define, run, ["--help"]) == 0
    assert "--size" in capsys.readouterr().out
    assert commands.run_with_own_flags("prog", define, run, ["--size=5"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --size=5 is wrong here")
    assert commands.run_with_own_flags("prog", define, run, ["--nope"]) == 2
