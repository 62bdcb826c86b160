"""The parser, assembled from each command module's `register`, and the dispatch."""

from __future__ import annotations

import argparse
import sys

from cli import bench, consult, evaluate, records, serve, train, weights

COMMANDS = (serve, weights, consult, records, train, bench, evaluate)  # the order `--help` lists them in


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description="SkinGPT: a private dermatology assistant")
    sub = parser.add_subparsers(dest="command")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # `python launch.py [--port N ...]` serves the app
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its own usage line
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from model.errors import UserFacingError

    try:
        return args.func(args)
    except UserFacingError as err:  # the one place a command's refusal becomes its exit status
        print(f"error: {err.for_cli()}", file=sys.stderr)  # settings and commands named as flags here
        return 2
