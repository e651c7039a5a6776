"""Help text of the `steerserve` subcommands: every option with its default, and `serve --help`
without loading vLLM.

`steerserve serve --help` (and `--help=steerserve`) is steerserve's own page, built from the
options steerserve adds (cli/serve.py's add_steering_args) in a plain argparse parser: it needs
neither torch nor vLLM, so it prints at once and nothing logs before it. vLLM's own options are
one `--help=...` away (`--help=all`, `--help=ModelConfig`, `--help=max-model-len`): those need
vLLM's parser, whose import logs torch's and Triton's warnings to stderr; `quiet_imports` holds
them back (and shows them only if the import fails).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

SERVE_DESCRIPTION = """\
vLLM's OpenAI-compatible server with SAE steering: MODEL served by vLLM, steerable through
the SAE features of --sae at --sae-layers and through direction vectors at --steering-layers."""
VLLM_OPTIONS = "[vLLM serve options]"
LIMITS = "[request limits: --max-request-bytes N ...]"
SERVE_EPILOG = """\
vLLM's serve options (engine, frontend, --config FILE.yaml, --api-key, ...) work as in `vllm serve`:
  all of them:   steerserve serve --help=all
  a section:     steerserve serve --help=ModelConfig   (Frontend, CacheConfig, ...; case-insensitive)
  a flag:        steerserve serve --help=max-model-len (_ or - accepted)
  this page:     steerserve serve --help (or --help=steerserve)"""
OWN_SECTIONS = ("steerserve", "steerserve limits")  # --help=TITLE of these: the own page
STATED_DEFAULT = "default:"  # in an option's help: it says its default itself ("(default: none, ...)")


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help states its default already;
    flags (off unless given), required options and options whose default is None are left as
    written (the help of the last says what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (STATED_DEFAULT in text or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class ServeHelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def stating_defaults_once(formatter_class: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """vLLM's formatter (an ArgumentDefaultsHelpFormatter) appends "(default: X)" to every
    option's help; this one not to an option whose help states its default already."""

    class Formatter(formatter_class):
        def _get_help_string(self, action: argparse.Action) -> str:
            text = action.help or ""
            return text if STATED_DEFAULT in text else super()._get_help_string(action)

    return Formatter


def serve_help_parser() -> argparse.ArgumentParser:
    """`steerserve serve`'s own options, as its help shows them (parses nothing)."""
    from steerserve.cli.serve import add_steering_args

    parser = argparse.ArgumentParser(prog="steerserve serve", description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
                                     formatter_class=ServeHelpFormatter, add_help=False)
    parser.add_argument("-h", "--help", action="help", help="this help; --help=all lists vLLM's options too")
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="the model: a local directory or a Hugging Face hub id (also --model, or `model:` in "
                             "--config)")
    add_steering_args(parser)
    return parser


def serve_usage(parser: argparse.ArgumentParser | None = None) -> str:
    """The usage line (after "usage: "): steerserve's options by name, then vLLM's."""
    parser = parser or serve_help_parser()
    limits = next(g for g in parser._action_groups if g.title == "steerserve limits")._group_actions
    formatter = parser._get_formatter()
    formatter.add_usage(None, [a for a in parser._actions if a not in limits and a.dest != "model"], [])
    usage = formatter.format_help().strip().removeprefix("usage: ").replace(parser.prog, f"{parser.prog} [MODEL]", 1)
    indent = " " * len(f"usage: {parser.prog} ")
    return f"{usage}\n{indent}{LIMITS} {VLLM_OPTIONS}"


def is_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)


def show_serve_help(argv: list[str]) -> None:
    """`serve --help`, `-h` or `--help=steerserve`: steerserve's page, without vLLM; any other
    `--help=...`: vLLM's parser (with the steerserve options) answers, its import kept quiet."""
    if any(a in ("-h", "--help") or a.lower() in (f"--help={s}" for s in OWN_SECTIONS) for a in argv):
        parser = serve_help_parser()
        parser.usage = serve_usage(parser)
        sys.stdout.write(parser.format_help())
        return
    from steerserve.cli.engine_checks import is_cpu_build
    from steerserve.cli.serve import build_parser

    if is_cpu_build():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    with quiet_imports():
        parser = build_parser()
    parser.parse_args(["serve", *argv])  # prints the page and exits


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Holds back what is written to stderr (file descriptor 2, so also C++ and subprocess output)
    while vLLM is imported for a help page; written out after all if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
