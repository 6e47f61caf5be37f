"""The ``supersub`` console script: hierarchies, data, evaluation and reports.

Every sub-command lives in this package (``supersub/cli/<area>.py``, each with its
``register(subparsers)``) but ``report``, registered by :mod:`supersub.report` beside the page
it builds; this file only wires them and turns known errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, attribute): each attribute is ``register(subparsers)``.
_COMMANDS = [
    ("supersub.cli.hierarchy", "register"),
    ("supersub.cli.data", "register"),
    ("supersub.cli.evaluate", "register"),
    ("supersub.report", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supersub",
        description="Super-Sub hierarchical classification: hierarchies, data, evaluation, reports.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module, attr in _COMMANDS:
        getattr(importlib.import_module(module), attr)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from supersub.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"supersub {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
