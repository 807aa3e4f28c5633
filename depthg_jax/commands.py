"""What every command shares: `--help` that lists the command's own flags and exits 0, one
`error:` line for a known fault (the traceback only with `--verbose`), and quiet library logs:
absl, JAX and Orbax INFO lines ("Unable to initialize backend 'tpu'", every checkpoint read)
are hidden unless `--verbosity=0` (INFO; 1 for DEBUG) asks for them.

`run_main(main)` replaces `absl.app.run(main)` for commands on the global FLAGS;
`run_with_own_flags` runs a command on a private FlagValues, so it can be called in-process
(tests, notebooks) as well as by `python -m` without clashing flags.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull")
VERBOSE_FLAG = "--verbose"
# The faults our code names in its messages; anything else is a bug and keeps its traceback.
KNOWN_FAULTS = (OSError, ValueError, FloatingPointError, MemoryError, RuntimeError)
VERBOSITY_FLAGS = ("--verbosity", "-v")
# Without --verbosity, library logs below WARNING are dropped (absl.app.run raises them to INFO).
QUIET_VERBOSITY = absl_logging.WARNING


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def format_help(fv: flags.FlagValues, doc: str | None = None) -> str:
    """The command's description and the flags its own modules define (not absl's)."""
    parts = [doc.strip()] if doc else []
    for module in sorted(fv.flags_by_module_dict()):
        if module.startswith(("absl.", "absl")):
            continue
        parts.append(fv.module_help(module))
    parts.append(f"{VERBOSE_FLAG}: on an error, print the traceback after the error line")
    parts.append(
        "--verbosity: library log level (absl's: -1 warnings, the default; 0 info; 1 debug)"
    )
    return "\n\n".join(parts)


def report_error(e: BaseException, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    message = str(e) or type(e).__name__
    hint = "" if verbose else f" (run with {VERBOSE_FLAG} for the traceback)"
    print(f"error: {message}{hint}", file=sys.stderr)


def run_main(main: Callable[[list[str]], object], doc: str | None = None) -> None:
    """absl.app.run(main) with `--help` (exit 0) and one error line for a known fault."""
    from absl import app

    argv = list(sys.argv)
    if wants_help(argv[1:]):
        print(format_help(flags.FLAGS, doc if doc is not None else _main_doc()))
        sys.exit(0)
    verbose = VERBOSE_FLAG in argv[1:]
    if verbose:
        argv.remove(VERBOSE_FLAG)

    def guarded(args):
        if not flags.FLAGS["verbosity"].present:  # absl.app.run set INFO; the user did not ask
            absl_logging.set_verbosity(QUIET_VERBOSITY)
        try:
            return main(args)
        except KNOWN_FAULTS as e:
            report_error(e, verbose)
            sys.exit(1)

    app.run(guarded, argv=argv)


def _main_doc() -> str | None:
    module = sys.modules.get("__main__")
    return getattr(module, "__doc__", None)


def run_with_own_flags(
    prog: str,
    define_flags: Callable[[flags.FlagValues], None],
    run: Callable[[flags.FlagValues], int],
    argv: Sequence[str],
    *,
    usage_status: int = 2,
    doc: str | None = None,
) -> int:
    """Defines the command's flags on a fresh FlagValues, parses argv (without the program
    name) and runs it; `--help` prints the flags and returns 0; a flag error prints
    `error: ...` and returns usage_status; a known fault one error line and 1."""
    fv = flags.FlagValues()
    define_flags(fv)
    argv = [str(a) for a in argv]
    if wants_help(argv):
        print(format_help(fv, doc or f"{prog}"))
        return 0
    verbose = VERBOSE_FLAG in argv
    argv = [a for a in argv if a != VERBOSE_FLAG]
    try:
        argv, verbosity = pop_verbosity(argv)
        fv([prog, *argv])
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return usage_status
    if verbosity is not None:  # asked for: route library logs through absl at that level
        absl_logging.use_absl_handler()
        absl_logging.set_verbosity(verbosity)
    try:
        return run(fv)
    except KNOWN_FAULTS as e:
        report_error(e, verbose)
        return 1


def pop_verbosity(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """Takes `--verbosity=N` / `--verbosity N` / `-v N` out of argv (a private FlagValues has no
    absl logging flags); returns (the rest, N or None). N may be a level name ("info")."""
    rest, level = [], None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in VERBOSITY_FLAGS:
            if not eq:
                if i + 1 >= len(args):
                    raise flags.Error(f"flag {name} needs a value")
                value, i = args[i + 1], i + 1
            level = _parse_level(name, value)
        else:
            rest.append(arg)
        i += 1
    return rest, level


def _parse_level(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    levels = {"debug": 1, "info": 0, "warning": -1, "error": -2, "fatal": -3}
    if value.lower() not in levels:
        raise flags.Error(f"{name}={value}: give an integer or one of {', '.join(levels)}")
    return levels[value.lower()]
