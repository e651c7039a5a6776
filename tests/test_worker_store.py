"""What workers keep for the API (issue 21): a byte budget that never drops a running request's
result, results freed when nobody takes them, a position recorded once across a preemption, and
gate reports a pipeline stage cannot inflate. The real SteeringRuntime and WorkerTakes, no engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from steerserve_sae.capture.store import FINISHED_SECONDS, WorkerStore
from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.protocol.rpc import CAPTURE_KEY, CAPTURES, EXTRA_ARGS_KEY, FULL_MARKER, GATE_REPORT_KEY, \
    GATE_REPORTS, REJECTIONS, TICKET_KEY, report_extra_arg, trace_key
from steerserve_sae.protocol.spec import FeatureEdit, Gate, SteeringSpec
from steerserve_sae.steering.runtime import SteeringRuntime
from steerserve.steering.worker_takes import WorkerTakes
from tests.request_views import RequestView
from tests.test_steering_units import tiny_sae


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_drops_finished_entries_first_and_never_a_running_requests():
    clock = Clock()
    store = WorkerStore(1000, clock)
    for req, key in (("a", "ka"), ("b", "kb"), ("c", "kc")):
        store.own(req, (CAPTURES, key))
        store.entry((CAPTURES, key), list)
    assert store.charge((CAPTURES, "ka"), 400) and store.charge((CAPTURES, "kb"), 400)
    store.finish(["a"])  # a's result now waits for its take
    clock.now = 1
    assert store.charge((CAPTURES, "kc"), 500)  # room made by dropping a's finished result, not b's live one
    assert store.take((CAPTURES, "ka")) is None
    assert (store.num_entries, store.held_bytes) == (2, 900)
    # b runs and its result cannot grow: it is marked full and emptied, c keeps what it holds
    assert not store.charge((CAPTURES, "kb"), 200)
    assert not store.charge((CAPTURES, "kb"), 1)  # stays full
    assert (store.held_bytes, store.full_total) == (500, 1)
    assert store.take((CAPTURES, "kb")).full
    assert store.full_marker()[FULL_MARKER].startswith("the workers' result store (--max-worker-store-mib")
    # an untaken result of a finished request goes FINISHED_SECONDS after its request ended
    store.finish(["c"])
    clock.now = 1 + FINISHED_SECONDS + 0.5
    store.finish([])
    assert store.stats() == {"store_entries": 0, "store_bytes": 0, "store_max_bytes": 1000, "store_full_total": 1}


def test_a_discard_that_arrives_before_its_request_records_drops_what_it_records():
    """vLLM may go on running a request whose handler was cancelled (the API discarded its keys
    already): what it records afterwards must not stay behind."""
    rt = _runtime()
    rt.store.discard((CAPTURES, "c"))
    _step(rt, [RequestView("r", {CAPTURE_KEY: CaptureSpec("c", (0,), top_k=2).to_extra_arg(), TICKET_KEY: "t"}, 4, 0, 4)])
    rt.rejections.record("t", "refused")  # a ticket's reason, kept whatever the budget
    assert rt.stats()["store_entries"] == 1
    rt.store.discard((REJECTIONS, "t"))
    assert rt.stats()["store_entries"] == 0 and rt.captures.take("c") is None
    rt.finish_requests(["r"])  # its requests finished: the keys are forgotten
    assert not rt.store._discarded


def _runtime(max_store_mib: int = 1, local=(0,), sae_layers=(0,)) -> SteeringRuntime:
    saes = {layer: tiny_sae() for layer in local}
    for layer, sae in saes.items():
        sae.layer = layer
    return SteeringRuntime(PluginConfig("mem", sae_layers, max_features=4, max_configs=2, max_store_mib=max_store_mib),
                           saes, torch.device("cpu"), max_rows=64)


STREAM = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))  # the stream at positions 0..15


def _step(rt: SteeringRuntime, views: list[RequestView]) -> None:
    """One forward; each view's rows carry the stream of their positions, as a recompute would."""
    rt.begin_step(RequestView.batch(views))
    hidden = torch.cat([STREAM[v.num_computed: v.num_computed + v.num_scheduled] for v in views])
    for layer in sorted(rt.saes):
        rt.apply(layer, hidden, torch.zeros_like(hidden))
    rt.end_step()


def _recording_args(capture: CaptureSpec, gated: SteeringSpec) -> dict:
    return {CAPTURE_KEY: capture.to_extra_arg(), EXTRA_ARGS_KEY: gated.to_extra_arg(),
            GATE_REPORT_KEY: report_extra_arg("g"), TICKET_KEY: "t"}


def _gated(layer: int = 0) -> SteeringSpec:
    return SteeringSpec.create([FeatureEdit(layer, 3, "add", 1.0, when=Gate(layer, 5, above=0.0))], "all")


@pytest.mark.parametrize("trace", [False, True])
def test_rows_computed_again_after_a_preemption_are_recorded_once(trace):
    """A preempted request is computed again from its first uncached position: captures, traces,
    aggregates, reconstruction sums and gate counts must equal those of one uninterrupted run."""
    capture = CaptureSpec("c", (0,), top_k=3, quality=not trace, trace=trace)
    key = trace_key("c", 0) if trace else "c"

    def run(chunks: list[tuple[int, int]], take_between: bool = False) -> tuple[dict, dict, list[int]]:
        rt = _runtime()
        args = _recording_args(capture, _gated())
        pieces = []
        for computed, scheduled in chunks:
            _step(rt, [RequestView("r", args, scheduled, computed, 4)])
            if take_between:  # a stream takes its trace piece by piece
                taken = rt.captures.take(key)
                pieces += taken[0]["positions"] if taken else []
        rt.finish_requests(["r"])
        end = rt.captures.take(key)
        pieces += end[0]["positions"] if end else []
        return end, rt.gate_reports.take("g"), pieces

    once, once_gates, _ = run([(0, 4), (4, 1), (5, 1), (6, 1)])
    # 4 prompt rows and 2 generated, then preempted: computed again from 0 (no cache), then on
    preempted, gates, _ = run([(0, 4), (4, 1), (5, 1), (0, 6), (6, 1)])
    assert preempted[0]["positions"] == once[0]["positions"] == list(range(7))
    assert preempted == once and gates == once_gates and gates["tokens"] == 7
    if trace:
        _, _, pieces = run([(0, 4), (4, 1), (5, 1), (2, 4), (6, 1)], take_between=True)  # a cache hit up to 2
        assert pieces == [0, 1, 2, 3, 4, 5, 6]  # a streamed trace never repeats a position
    else:
        assert preempted[0]["aggregate"]["num_tokens"] == 7 and preempted[0]["quality"]["tokens"] == 7


def test_a_result_that_outgrows_the_budget_is_marked_full_and_frees_its_bytes():
    rt = _runtime()
    rt.store.max_bytes = 4000  # 10 positions of a top-3 trace (368 bytes each), 2 of a top-1 (232)
    capture = CaptureSpec("big", (0,), top_k=3, trace=True)
    small = CaptureSpec("small", (0,), top_k=1, trace=True)
    _step(rt, [RequestView("r", {CAPTURE_KEY: capture.to_extra_arg()}, 8, 0, 16),
               RequestView("s", {CAPTURE_KEY: small.to_extra_arg()}, 2, 0, 16)])
    held = rt.store.held_bytes
    _step(rt, [RequestView("r", {CAPTURE_KEY: capture.to_extra_arg()}, 8, 8, 16)])
    assert rt.store.held_bytes < held  # "big" was emptied; "small" (running) kept
    assert rt.stats()["store_full_total"] == 1
    assert FULL_MARKER in rt.captures.take(trace_key("big", 0))
    assert rt.captures.take(trace_key("small", 0))[0]["positions"] == [0, 1]
    assert rt.stats()["store_entries"] == 0 and rt.stats()["store_bytes"] == 0


def test_a_pipeline_stage_reports_only_the_gates_on_its_own_layers():
    """Stage 2 of a PP=2 split holds layer 1 only and never writes the gate column of a layer-0
    gate: whatever an earlier step left in that column must not be counted there (the API takes
    the largest count over ranks)."""
    rt = _runtime(local=(1,), sae_layers=(0, 1))
    spec = SteeringSpec.create([FeatureEdit(0, 3, "add", 1.0, when=Gate(0, 5, above=0.0)),
                                FeatureEdit(1, 4, "add", 1.0, when=Gate(1, 6, above=-1e9))], "all")
    rt.planner.gate_state.fill_(1.0)  # left by earlier steps
    _step(rt, [RequestView("r", {EXTRA_ARGS_KEY: spec.to_extra_arg(), GATE_REPORT_KEY: report_extra_arg("g")},
                           5, 0, 5)])
    column = spec.gates.index(Gate(0, 5, above=0.0))
    report = rt.gate_reports.take("g")
    assert report["tokens"] == 5
    assert report["passed"][column] == 0 and report["passed"][1 - column] == 5


class _Engine:
    """collective_rpc as the engine client has it, over a real WorkerStore per rank."""

    def __init__(self, ranks: list[dict]):
        self.ranks = ranks
        self.calls: list[list] = []

    async def collective_rpc(self, method, args=()):
        wanted, discarded = args if len(args) == 2 else (args[0], [])
        self.calls.append(([tuple(w) for w in wanted], [tuple(w) for w in discarded]))
        for rank in self.ranks:
            for w in discarded:
                rank.pop(tuple(w), None)
        return [[rank.pop(tuple(w), None) for w in wanted] for rank in self.ranks]


def test_discards_go_in_the_coalesced_takes_and_a_full_result_is_a_503():
    async def main():
        engine = _Engine([{(CAPTURES, "x"): {FULL_MARKER: "store full"}, (GATE_REPORTS, "g"): {"tokens": 1}},
                          {(CAPTURES, "x"): {1: {}}}])
        takes = WorkerTakes(engine)
        takes.discard([(GATE_REPORTS, "g")])
        with pytest.raises(Exception) as raised:
            await takes.take(CAPTURES, "x")
        assert engine.calls == [([(CAPTURES, "x")], [(GATE_REPORTS, "g")])]  # one RPC
        assert (raised.value.status, raised.value.code) == (503, "worker_store_full")
        assert engine.ranks == [{}, {}] and takes.discarded_total == 1
        with pytest.raises(ValueError):
            takes.discard([("kv_cache", "a")])

    asyncio.run(main())


def test_worker_store_budget_reaches_the_workers_and_the_log():
    config = PluginConfig("mem", (0,), max_store_mib=64)
    assert PluginConfig.from_additional_config({"steerserve": config.to_dict()}).max_store_bytes == 64 * 2**20
    assert np.isclose(_runtime(max_store_mib=3).store.max_bytes / 2**20, 3)
