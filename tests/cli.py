"""Runs one of the package's absl commands as a user would: a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(module: str, args, *, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a subprocess on one CPU device; stdout/stderr captured."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{module} exited {out.returncode}:\n{out.stderr[-4000:]}")
    return out


def run_in_process(define_flags, run, args) -> int:
    """Parses `args` with a command's own flags (a private FlagValues) and runs it here."""
    from depthg_jax import commands

    return commands.run_with_own_flags("prog", define_flags, run, args)
