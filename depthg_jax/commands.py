"""Running a command with its own absl flags (a private FlagValues), so that commands can be
called in-process (tests, notebooks) as well as by `python -m` without clashing flags."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def run_with_own_flags(
    prog: str,
    define_flags: Callable[[flags.FlagValues], None],
    run: Callable[[flags.FlagValues], int],
    argv: Sequence[str],
    *,
    usage_status: int = 2,
) -> int:
    """Defines the command's flags on a fresh FlagValues, parses argv (without the program
    name) and runs it; a flag error prints `error: ...` and returns usage_status.

    `--help` (also -h, -?, --helpshort, --helpfull) prints the usage and every flag of the
    command with its help and default to stdout and returns 0 without running anything.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    if any(str(a).split("=")[0] in HELP_FLAGS for a in argv):
        print(f"usage: {prog} [--flag=value ...]\n")
        print(fv.get_help(include_special_flags=False).strip())
        return 0
    try:
        fv([prog, *map(str, argv)])
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return usage_status
    return run(fv)
