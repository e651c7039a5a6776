"""`steerserve` command line: `steerserve --help` lists the subcommands, one line each.

Each subcommand parses its own options (so `steerserve SUB --help` is that command's help):
`serve` with vLLM's own serve parser plus the SAE options (cli/serve.py), `eval` and `run-batch`
with theirs, passing the options they do not know on to the `serve` they start. The modules
behind a subcommand are imported only when it runs: vLLM takes seconds to import, so `--help`,
`serve --help` (cli/help.py), `eval` and `run-batch` never load it in this process.

The default model's build and the tiny test model are not subcommands (they are not installed):
`make default-model`, `make tiny-model OUT=DIR`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str  # the line `steerserve --help` shows
    run: Callable[[list[str]], int | None]  # takes the arguments after the command's name


def _serve(argv: list[str]) -> int | None:
    from steerserve.cli.help import is_help, show_serve_help

    if is_help(argv):  # steerserve's own page needs no vLLM (cli/help.py)
        return show_serve_help(argv)
    from steerserve.cli.serve import serve

    return serve(argv)


def _eval(argv: list[str]) -> int | None:
    from steerserve.analysis.eval import main

    return main(argv)


def _dashboards(argv: list[str]) -> int | None:
    from steerserve.analysis.dashboards import main

    return main(argv)


def _bench_steering(argv: list[str]) -> int | None:
    from steerserve.analysis.steering_bench.runner import main

    return main(argv)


def _run_batch(argv: list[str]) -> int | None:
    from steerserve.batch.offline import run_batch

    return run_batch(argv)


COMMANDS = {
    "serve": Command("vLLM's OpenAI-compatible server with SAE steering", _serve),
    "eval": Command("SAE quality and steering-effect reports from a server", _eval),
    "dashboards": Command("feature dashboards (histograms, top examples) of a corpus, into SQLite", _dashboards),
    "bench-steering": Command("steering methods against prompting on a set of concepts, judged", _bench_steering),
    "run-batch": Command("a JSONL file of OpenAI batch requests, offline", _run_batch),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve", description="SAE-steerable OpenAI-compatible server",
                                     epilog="`steerserve COMMAND --help` shows a command's options.")
    commands = parser.add_subparsers(dest="command", required=True, title="commands")
    for name, command in COMMANDS.items():
        # No options here: the command's own parser reads them all (parse_known_args hands them on).
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    before = argv[: argv.index(args.command)]
    if before:  # options before the command belong to no command
        parser.error(f"unrecognized arguments: {' '.join(before)}")
    code = COMMANDS[args.command].run(rest)
    if code:
        sys.exit(code)
