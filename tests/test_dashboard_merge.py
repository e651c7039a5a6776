"""Dashboard parts from data-parallel engines merge into what one engine would have recorded.

The workers' own accumulator (capture/dashboards.py) records random sparse documents three ways:
all of them in one accumulator, and split between two "engines". The merge of the two parts
(protocol/dashboard_merge.py) must equal the single accumulator: counts, histograms and maxima
exactly, sums to float64 rounding, and the same top-N examples per feature (slots compared in
activation order: the accumulator keeps its slots unordered). Through the real worker runtime:
a tensor-parallel peer records the same numbers but does not answer (else every count doubles),
and a dashboard spec the accumulator cannot take is refused at receipt, never raised in the step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerserve_sae.capture.dashboards import DashboardAccumulator
from steerserve_sae.protocol.capture import CaptureSpec, DashboardSpec
from steerserve_sae.protocol.dashboard_merge import decode, merge_dashboard_layers, merge_parts
from steerserve_sae.protocol.rpc import CAPTURE_KEY
from tests.request_views import RequestView
from tests.test_worker_robustness import runtime, step

D_SAE, TOP_N = 48, 4
SPEC = DashboardSpec(0, top_n=TOP_N, before=3, after=2, bins=12, low=1e-2, high=1e2)


def _documents(seed: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(count):
        rows = int(torch.randint(3, 20, (1,), generator=g))
        values = torch.rand(rows, D_SAE, generator=g) * 20
        docs.append(torch.where(torch.rand(rows, D_SAE, generator=g) < 0.15, values, torch.zeros(())))
    return docs


def _record(docs: list[tuple[int, torch.Tensor]]) -> dict:
    acc = DashboardAccumulator(D_SAE, SPEC, torch.device("cpu"))
    for doc, f in docs:
        counted = torch.ones(len(f), dtype=torch.bool)
        counted[0] = False  # a special token, as the capture leaves out
        for start in range(0, len(f), 7):  # chunks, as prefill delivers them
            acc.add(f[start:start + 7], doc, start, counted[start:start + 7])
    return acc.result()


def _ordered_tops(a: dict) -> dict:
    order = np.argsort(-a["top_val"], axis=1, kind="stable")
    return {name: np.take_along_axis(a[name], order if a[name].ndim == 2 else order[:, :, None], axis=1)
            for name in ("top_val", "top_doc", "top_pos", "top_win")}


def test_two_engines_parts_merge_into_the_single_engine_result():
    docs = list(enumerate(_documents(0, 30)))
    whole = _record(docs)
    first, second = _record(docs[0::2]), _record(docs[1::2])
    merged = merge_dashboard_layers([{3: first}, {3: second}])[3]
    want, got = decode(whole), decode(merged)
    assert merged["tokens"] == whole["tokens"] == sum(len(f) - 1 for _, f in docs)
    np.testing.assert_array_equal(got["features"], want["features"])
    for name in ("fired", "hist", "max"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-12)
    w, g = _ordered_tops(want), _ordered_tops(got)
    for name in ("top_val", "top_doc", "top_pos"):
        np.testing.assert_array_equal(g[name], w[name], err_msg=name)
    np.testing.assert_array_equal(np.isnan(g["top_win"]), np.isnan(w["top_win"]))
    np.testing.assert_array_equal(np.nan_to_num(g["top_win"]), np.nan_to_num(w["top_win"]))
    # both engines' documents are among the examples, so the merge really took from each part
    assert {d % 2 for d in g["top_doc"][g["top_val"] > 0].tolist()} == {0, 1}


def test_one_part_is_taken_as_it_came():
    part = _record(list(enumerate(_documents(1, 4))))
    assert merge_dashboard_layers([{2: part}, None, None]) == {2: part}
    assert merge_dashboard_layers([None, None]) == {}


def _dashboard_view(req_id: str, dashboard: DashboardSpec, rows: int = 5) -> RequestView:
    capture = CaptureSpec(f"dash-{req_id}", (0,), 1, frozenset({0}), dashboard=dashboard)
    return RequestView(req_id, {CAPTURE_KEY: capture.to_extra_arg()}, rows, 0, rows)


def test_only_the_first_tensor_parallel_rank_answers():
    """Two workers of one engine (TP ranks 0 and 1) see the same stream and record the same
    document; the take reaches both, and only rank 0's part may come back."""
    first, peer = runtime(), runtime()
    peer.captures.answers_dashboards = False  # as vllm_hooks/runner_patch.py sets it on ranks after the first
    view = _dashboard_view("doc", DashboardSpec(0, top_n=2, before=1, after=1, bins=4, low=1e-2, high=1e2))
    for rt in (first, peer):
        step(rt, [view])
    per_rank = [first.captures.take("dash-doc"), peer.captures.take("dash-doc")]
    assert per_rank[1] is None and per_rank[0] is not None
    merged = merge_dashboard_layers(per_rank)[0]
    assert merged["tokens"] == 4  # 5 rows, the first left out as a special token
    alone = runtime()
    step(alone, [view])
    want, merged = decode(alone.captures.take("dash-doc")[0]), decode(merged)
    assert want["fired"].sum() > 0
    for name in ("features", "fired", "hist", "max"):
        np.testing.assert_array_equal(merged[name], want[name], err_msg=name)


DEGENERATE = {  # what no API request carries, but a worker must survive
    "equal log10 of low and high": dict(low=1e10, high=10000000000.000002),
    "high infinite": dict(high=float("inf")),
    "low NaN": dict(low=float("nan")),
    "low zero": dict(low=0.0),
    "high below low": dict(low=10.0, high=1.0),
    "no bins": dict(bins=0),
    "negative window": dict(before=-3),
    "no top examples": dict(top_n=0),
    "document id past int32": dict(doc=2**40),
    "group past groups": dict(groups=1, group=1),
}


@pytest.mark.parametrize("name", DEGENERATE)
def test_a_degenerate_dashboard_spec_is_refused_and_its_neighbour_recorded(name):
    rt = runtime()
    good = DashboardSpec(0, top_n=2, before=1, after=1, bins=4, low=1e-2, high=1e2)
    bad = DashboardSpec(**{**good.to_json(), "ungrouped": frozenset(), **DEGENERATE[name]})
    step(rt, [_dashboard_view("bad", bad), _dashboard_view("good", good)])
    assert rt.rejected_requests_total == 1
    assert rt.captures.take("dash-bad") is None
    assert rt.captures.take("dash-good")[0]["tokens"] == 4


def test_parts_with_different_settings_are_refused():
    part = _record(list(enumerate(_documents(2, 3))))
    with pytest.raises(ValueError, match="different settings"):
        merge_parts([part, {**part, "bins": part["bins"] + 1}])
