"""The API-to-worker protocol (steerserve_sae.protocol): torch-free, the API layer's only view of
the plugin, the worker extension's exact method set, and how ranks' replies merge.

No engine: the merges are pinned on the replies tensor- and pipeline-parallel ranks give.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerserve_sae.protocol import rpc
from steerserve_sae.protocol.signing import RESERVED_PREFIX
from steerserve_sae.protocol.spec import Gate, gate_passes, gate_problem

ROOT = Path(__file__).resolve().parents[1]
# The CLI (cli.py, or the cli/ package) and what it runs before vLLM starts: it checks --sae
# against the files and the model, and hands vLLM the worker extension's name, so it may reach
# into the plugin.
START_UP = ("cli.py", "cli/", "sae_source.py")


def test_the_protocol_imports_without_torch():
    """numpy is allowed: direction vectors travel as float32 arrays (spec.decode_vector)."""
    code = ("import pkgutil, sys, importlib, steerserve_sae.protocol as p\n"
            "names = [m.name for m in pkgutil.iter_modules(p.__path__)]\n"
            "[importlib.import_module(f'steerserve_sae.protocol.{n}') for n in names]\n"
            "print(sorted(names), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['capture', 'dashboard_merge', 'plugin_config', 'rpc', 'signing', 'spec'] False"


def _plugin_imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules += [node.module] if node.level == 0 else []
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return [m for m in modules if m.split(".")[0] == "steerserve_sae"]


def test_the_api_layer_imports_only_the_protocol_from_the_plugin():
    files = sorted(p for p in (ROOT / "server" / "steerserve").rglob("*.py")
                   if not p.relative_to(ROOT / "server" / "steerserve").as_posix().startswith(START_UP))
    outside = {f"{p.relative_to(ROOT)}: {m}" for p in files for m in _plugin_imports(p)
               if not m.startswith("steerserve_sae.protocol.") and m != "steerserve_sae.protocol"}
    assert len(files) > 30 and not outside
    # and the rule has teeth: the start-up modules do reach further
    start_up = [p for p in (ROOT / "server" / "steerserve").rglob("*.py") if p.relative_to(ROOT / "server" / "steerserve").as_posix().startswith(START_UP)]
    assert any(not m.startswith("steerserve_sae.protocol") for p in start_up for m in _plugin_imports(p))


def test_the_worker_extension_implements_exactly_the_protocols_methods():
    from steerserve_sae.vllm_hooks.worker_extension import SteeringWorkerExtension

    methods = {name for name in vars(SteeringWorkerExtension) if not name.startswith("_")}
    assert methods == set(rpc.METHODS) and len(rpc.METHODS) == 6


def test_extra_args_keys_are_reserved_so_clients_cannot_set_them():
    from steerserve.errors import APIError
    from steerserve.middleware.guard import check_vllm_xargs

    assert all(key.startswith(RESERVED_PREFIX) for key in rpc.EXTRA_ARGS_KEYS) and len(set(rpc.EXTRA_ARGS_KEYS)) == 4
    for key in rpc.EXTRA_ARGS_KEYS:
        with pytest.raises(APIError) as refused:
            check_vllm_xargs({"vllm_xargs": {key: "x"}})
        assert (refused.value.param, refused.value.code) == (f"vllm_xargs.{key}", "reserved_field")


def test_sae_info_merges_pipeline_stages_by_layer():
    info = {layer: {"layer": layer, "d_sae": 8} for layer in (1, 2, 3)}
    saes, stages = rpc.merge_sae_info([[info[3], info[1]], [info[3], info[1]], [info[2]], []])
    assert saes == [info[1], info[2], info[3]]
    assert sorted(map(sorted, stages)) == [[1, 3], [2]]


def test_stats_add_up_over_data_parallel_engines():
    engine = {"steered_tokens_total": 5, "store_bytes": 10, "sae_layers": [1], "steering_kernel": "native",
              "steering_seconds_total": 0.5}
    merged = rpc.merge_stats([engine, {}, engine | {"steered_tokens_total": 7, "steering_kernel": "torch"}])
    assert merged == {"steered_tokens_total": 12, "store_bytes": 20, "sae_layers": [1], "steering_kernel": "native",
                      "steering_seconds_total": 1.0, "active_configs": 0, "rejected_requests_total": 0,
                      "execute_seconds_total": 0, "store_entries": 0, "store_full_total": 0}
    assert rpc.merge_stats([{}, {}]) == {}


def test_gate_reports_take_each_stages_own_counts():
    # two stages: the first holds gate 0's layer, the second gate 1's (each reads 0 for the other)
    assert rpc.merge_gate_reports([{"tokens": 9, "passed": [4, 0]}, None, {"tokens": 9, "passed": [0, 6]}]) == \
        {"tokens": 9, "passed": [4, 6]}
    assert rpc.merge_gate_reports([None, None]) == {"tokens": 0, "passed": []}


def test_per_layer_replies_and_first_replies():
    assert rpc.merge_layers([{1: "a"}, None, {"2": "b"}, {}]) == {1: "a", 2: "b"}
    assert rpc.first_reply([None, {"decoder_norm": 1.0}, {"decoder_norm": 2.0}]) == {"decoder_norm": 1.0}
    assert rpc.first_reply([None]) is None
    assert rpc.store_full_reason([None, {1: {}}, {rpc.FULL_MARKER: "full"}]) == "full"
    assert rpc.store_full_reason([{1: {}}, "refused"]) is None
    assert rpc.trace_key("abc", 2) == "abc/2"


def test_one_gate_rule_for_floats_tensors_and_the_kernels_bounds():
    gate = Gate(0, 1, above=0.5, below=2.0)
    values = [0.4, 0.5, 0.6, 1.99, 2.0, 3.0]
    assert [bool(gate_passes(v, gate.above, gate.below)) for v in values] == [False, False, True, True, False, False]
    bounds = torch.tensor([gate.bounds] * len(values))
    from steerserve_sae.steering.gating import passes

    assert passes(torch.tensor(values), bounds).tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert Gate(0, 1, above=0.5).bounds == (0.5, math.inf)


@pytest.mark.parametrize("above, below, bound, message", [
    (None, None, None, "a gate needs `above`, `below` or both"),
    (math.nan, None, "above", "above must be a finite number"),
    (0.0, math.inf, "below", "below must be a finite number"),
    (2.0, 1.0, "below", "no activation is above 2 and below 1"),
])
def test_one_gate_interval_rule_for_the_api_and_the_workers(above, below, bound, message):
    from steerserve.errors import APIError
    from steerserve.steering.schema import parse_steering

    assert gate_problem(above, below) == (bound, message)
    when = {"layer": 0, "index": 1} | ({} if above is None else {"above": above}) | ({} if below is None else {"below": below})
    with pytest.raises(ValueError, match=message.replace("`", ".")):
        Gate.from_json(when)
    raw = {"features": [{"layer": 0, "index": 1, "mode": "add", "value": 1.0, "when": when}]}
    with pytest.raises(APIError) as refused:
        parse_steering(raw, {0: 8}, 4, 100.0)
    at = "steering.features[0].when"
    assert (refused.value.param, refused.value.code, refused.value.message) == \
        (f"{at}.{bound}" if bound else at, "invalid_gate", message)
    assert gate_problem(0.5, 2.0) is None and gate_problem(None, -1.0) is None
