"""The `distar` console script. Each subcommand lives in distar/commands/<name>.py with
`add_parser(subparsers)` and `run(args) -> int`; user errors print one message and exit 2, no traceback."""
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
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .config import ConfigError

    return (UserError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="distar", description="Diff-Instruct* post-training of one-step generators")
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
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except _user_error_types() as err:
        print(f"distar {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
