"""The `steerserve` command line: subcommands listed with a line each, each with its own --help,
vLLM imported only by `serve`, and a missing extra named with its install line. No engine starts."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

STEERSERVE = Path(sys.executable).with_name("steerserve")  # the installed console script


def run(*args: str, prelude: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """`steerserve ARGS` through steerserve.cli.main in a fresh interpreter; `prelude` runs first,
    and the last line of stdout says whether vLLM was imported."""
    code = (f"import sys\n{prelude}\nfrom steerserve.cli import main\n"
            f"try:\n    main({list(args)!r})\n"
            "finally:\n    print('vllm imported:', 'vllm' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"COLUMNS": "100"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_help_lists_every_subcommand_with_one_line_each():
    result = subprocess.run([str(STEERSERVE), "--help"], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "usage: steerserve [-h] {serve,eval,dashboards,bench-steering,run-batch} ..."
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in lines if line.startswith("    ")}
    assert listed == {
        "serve": "vLLM's OpenAI-compatible server with SAE steering",
        "eval": "SAE quality and steering-effect reports from a server",
        "dashboards": "feature dashboards (histograms, top examples) of a corpus, into SQLite",
        "bench-steering": "steering methods against prompting on a set of concepts, judged",
        "run-batch": "a JSONL file of OpenAI batch requests, offline",
    }


def test_help_and_the_light_subcommands_do_not_import_vllm():
    result = run("--help")
    assert result.returncode == 0 and "run-batch" in result.stdout
    assert result.stdout.splitlines()[-1] == "vllm imported: False"


@pytest.mark.parametrize(("command", "usage", "option"), [
    ("eval", "usage: steerserve eval [-h] [--data FILE]", "--api-key KEY"),
    ("run-batch", "usage: steerserve run-batch [-h] -i INPUT_FILE -o OUTPUT_FILE", "--errors-file ERRORS_FILE"),
    ("bench-steering", "usage: steerserve bench-steering [-h] --concepts CONCEPTS", "--judge-url JUDGE_URL"),
])
def test_subcommand_help_is_its_own(command, usage, option):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)
    assert option in result.stdout
    assert result.stdout.splitlines()[-1] == "vllm imported: False"


SERVE_USAGE = "usage: steerserve serve [MODEL] [-h] [--sae DIR_OR_HUB_ID]"


def test_serve_help_is_steerserves_own_page_at_once():
    """`serve --help` (and `--help=steerserve`): steerserve's options, each named in the usage
    line, with steerserve's description (not vLLM's "Defaults to Qwen/Qwen3-0.6B") and the way to
    vLLM's options; vLLM (and torch) not imported, so nothing is logged before it, in well under
    a second instead of vLLM's 15 s."""
    from steerserve.cli.help import serve_help_parser

    result = run("serve", "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    page = result.stdout.removesuffix("vllm imported: False\n")
    assert page != result.stdout and page.startswith(SERVE_USAGE)
    usage = page.split("\n\n")[0]
    assert usage.endswith("[request limits: --max-request-bytes N ...] [vLLM serve options]")
    own = next(g for g in serve_help_parser()._action_groups if g.title == "steerserve")._group_actions
    assert len(own) == 16 and all(f"[{a.option_strings[0]} " in usage for a in own), usage
    assert "Defaults to Qwen" not in page and "steerserve serve --help=all" in page
    assert "\nsteerserve limits:\n" in page and "  --max-request-bytes N" not in usage
    again = run("serve", "--help=steerserve")
    assert again.stderr == "" and again.stdout == result.stdout


@pytest.mark.parametrize("command", ["serve", "eval", "dashboards", "bench-steering", "run-batch"])
def test_every_option_has_help_stating_its_default(command):
    """Every option of steerserve's subcommands (serve's: the ones steerserve adds) has help, and
    the help states its default, except a required option's and a flag's (off unless given)."""
    from steerserve.analysis import dashboards, eval as eval_command
    from steerserve.analysis.steering_bench import runner
    from steerserve.batch import offline
    from steerserve.cli.help import serve_help_parser

    parser = {"serve": serve_help_parser, "eval": eval_command._parser, "dashboards": dashboards._parser,
              "bench-steering": runner._parser, "run-batch": offline._parser}[command]()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings or action.dest
        if action.option_strings and not action.required and action.nargs != 0:
            assert "default: " in formatter._expand_help(action), action.option_strings


def test_the_api_key_of_eval_dashboards_and_bench_goes_to_the_server_it_starts():
    from steerserve.analysis.eval import _parser
    from steerserve.serve_process import api_key_of, parse_server_args

    args, serve_args = parse_server_args(_parser(), ["--max-texts", "3", "--api-key", "k1", "MODEL", "--sae", "S"])
    assert (args.max_texts, args.api_key, serve_args) == (3, "k1", ["MODEL", "--sae", "S", "--api-key", "k1"])
    assert api_key_of(serve_args) == "k1"  # what server_client's requests send
    assert parse_server_args(_parser(), ["MODEL"])[1] == ["MODEL"]


def test_serve_help_of_vllms_options_is_vllms_parser_with_the_sae_options():
    """vLLM's grouped help (`--help=all` shows every group): steerserve's groups beside vLLM's,
    under steerserve's usage line; vLLM's import logs nothing before it (torch's deprecation
    warnings, "Triton is installed, but doesn't include CPU backend"), and an option whose help
    states its default does not get vLLM's "(default: X)" too."""
    result = run("serve", "--help=all", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert result.stdout.startswith(SERVE_USAGE)
    for option in ("--sae DIR_OR_HUB_ID ", "--sae-layers LAYERS [LAYERS ...]",
                   "--steering-layers LAYERS [LAYERS ...]", "--max-worker-store-mib",
                   "--client-priority-range", "--tensor-parallel-size", "--max-model-len"):
        assert option in result.stdout, option  # steerserve's, its limits', vLLM's
    assert "Defaults to Qwen" not in result.stdout
    flat = " ".join(result.stdout.split())
    assert "most features one request may steer (default: 64) --max-worker-store-mib" in flat  # added once
    assert "(default: none, no SAE features) --sae-k" in flat  # stated: vLLM's "(default: None)" not added


@pytest.mark.parametrize(("args", "message"), [
    ((), "error: the following arguments are required: command"),
    (("make-tiny", "out"), "error: argument command: invalid choice: 'make-tiny' (choose from 'serve', 'eval', "
                           "'dashboards', 'bench-steering', 'run-batch')"),
    (("--seed=1", "eval"), "error: unrecognized arguments: --seed=1"),
])
def test_bad_command_lines_are_usage_errors(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_bad_layer_number_is_an_error_line_not_a_traceback():
    result = run("serve", "model", "--sae", "sae", "--sae-layers", "8,x", timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: --sae-layers: 'x' is not a layer number"


def test_steering_layers_outside_the_model_stop_start_up(tiny_model_dir):
    """Checked against the local model's config before any engine starts (the workers check a hub
    model's on load)."""
    result = run("serve", str(tiny_model_dir), "--steering-layers", "1,7", timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (f"error: --steering-layers [7]: {tiny_model_dir} has 4 decoder layers "
                                              "(0..3)")
    bad = run("serve", str(tiny_model_dir), "--steering-layers", "1,x", timeout=300)
    assert bad.stderr.splitlines()[-1] == "error: --steering-layers: 'x' is not a layer number"


def test_eval_without_matplotlib_names_the_extra_before_starting_anything():
    """`--base-url` points at a closed port: the missing extra is reported before any request."""
    result = run("eval", "--base-url", "http://127.0.0.1:9", prelude="sys.modules['matplotlib'] = None")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr == ("eval: the plots need matplotlib, which serving does not install: "
                             "pip install 'steerserve[eval]'\n")
