"""The `distar` console script. Each subcommand lives in distar/commands/<name>.py with
`add_parser(subparsers)` and `run(args) -> int`.

Only `UserError` (bad input: ConfigError and ModelSpecError are UserErrors) and pydantic's
`ValidationError` print as one line with exit code 2; every other exception keeps its traceback, because
it is a bug to report, not a mistake to correct."""
from __future__ import annotations

import argparse
import importlib
import sys

from distar.errors import UserError  # absolute: `python -m distar.cli` must share the class with commands

# subcommand -> module in distar.commands (one line per command)
COMMANDS = {
    "train": "distar.commands.train",
    "generate": "distar.commands.generate",
    "eval": "distar.commands.evaluate",
    "serve": "distar.commands.serve",
    "register": "distar.commands.register",
    "export": "distar.commands.export",
    "plan": "distar.commands.plan",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="distar", description="Diff-Instruct* post-training of one-step generators")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=0,
                      help="debug logging (module names shown)")
    loud.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                      help="warnings and results only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as err:
            if err.name != modname:
                raise
            continue  # command not built yet
        mod.add_parser(sub)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from .stopping import ExitAtOnce

    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    named = f"distar {words[0]}" if words and words[0] in COMMANDS else "distar"
    # Ctrl-C while the libraries import: nothing runs yet, exit at once (a KeyboardInterrupt inside an import
    # leaves modules half-initialised: numpy's lazy linalg then recurses until RecursionError)
    with ExitAtOnce(f"{named}: interrupted"):
        from pydantic import ValidationError

        from .logs import setup_logging

        parser, modules = build_parser()
        args = parser.parse_args(argv)
        setup_logging(args.verbosity)
        import torch  # noqa: F401  (and numpy)
    try:
        return int(modules[args.command].run(args) or 0)
    except (UserError, ValidationError) as err:
        print(f"distar {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
