"""Conditional (gated) edits in every backend, against the definition (no vLLM engine).

Two steered layers; requests gate every mode by a feature of the same layer (read on the
unedited stream) or of the earlier layer, with `above`, `below` and a band, mixed in one step
with ungated and unsteered requests. The expected stream is computed here straight from the
definition: the dense code of each layer's stream, the gate's pass/fail per row, then each
edit's term times it. Thresholds sit halfway between neighbouring activations of the rows, so
the encoders' summation order cannot flip a gate. The gate report counts are checked too.
tests/test_triton_kernel.py runs the same cases through the Triton kernels in the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerserve_sae.protocol.rpc import GATE_REPORT_KEY, report_extra_arg
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.steering.runtime import SteeringRuntime
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY
from steerserve_sae.protocol.spec import FeatureEdit, Gate, SteeringSpec
from tests.request_views import RequestView
from tests.test_cpu_kernel import D_MODEL, make_sae

ROWS = [6, 5, 7, 4, 3]  # per request; the last one is unsteered


def dense(sae: SAEWeights, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    x = hidden.float() + residual.float()
    return sae.activation_fn.dense(x @ sae.W_enc.float().T + sae.b_enc.float())


def split_threshold(values: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring distinct values, near the median: some rows
    pass, some do not, and none sits on the boundary."""
    distinct = sorted(set(values.tolist()))
    assert len(distinct) >= 2, values
    i = max(1, len(distinct) // 2)
    return (distinct[i - 1] + distinct[i]) / 2


def inputs(activation: str):
    g = torch.Generator().manual_seed(21)
    n = sum(ROWS)
    streams = {layer: (torch.randn(n, D_MODEL, generator=g), 3 * torch.randn(n, D_MODEL, generator=g))
               for layer in (0, 1)}
    saes = {layer: make_sae(activation, torch.float32, seed=31 + layer, layer=layer) for layer in (0, 1)}
    return saes, streams


def specs(saes, streams) -> list[SteeringSpec]:
    """Four gated specs over the rows of their own request (ROWS order)."""
    f0, f1 = dense(saes[0], *streams[0]), dense(saes[1], *streams[1])
    starts = np.cumsum([0, *ROWS])
    rows = [slice(starts[i], starts[i + 1]) for i in range(len(ROWS))]

    def busy(f, r):  # the feature active on the most of the request's rows (then the largest)
        return int(((f[r] > 0).sum(0) * 1000 + f[r].sum(0)).argmax())

    g0 = busy(f0, rows[0])
    same_layer = Gate(0, g0, above=split_threshold(f0[rows[0], g0]))
    g1 = busy(f0, rows[1])
    earlier = Gate(0, g1, below=split_threshold(f0[rows[1], g1]))
    g2 = busy(f1, rows[2])
    t = sorted(set(f1[rows[2], g2].tolist()))
    band = Gate(1, g2, above=(t[0] + t[1]) / 2, below=(t[-2] + t[-1]) / 2) if len(t) > 3 else \
        Gate(1, g2, above=split_threshold(f1[rows[2], g2]))
    g3 = busy(f0, rows[2])
    earlier_for_third = Gate(0, g3, above=split_threshold(f0[rows[2], g3]))
    top0, top1 = int(f0[rows[0]].sum(0).argmax()), int(f1[rows[1]].sum(0).argmax())
    return [
        SteeringSpec.create([FeatureEdit(0, top0, "clamp", 6.0, same_layer), FeatureEdit(0, 9, "add", 1.5, same_layer),
                             FeatureEdit(1, 40, "add", -1.0)]),
        SteeringSpec.create([FeatureEdit(1, top1, "scale", 3.0, earlier), FeatureEdit(1, 11, "add", 2.0, earlier),
                             FeatureEdit(0, 5, "clamp", 2.5)]),
        SteeringSpec.create([FeatureEdit(1, g2, "ablate", 0.0, band), FeatureEdit(1, 7, "add", 1.0, earlier_for_third)]),
        SteeringSpec.create([FeatureEdit(0, 3, "add", 2.0, Gate(0, 3, above=1e6))]),  # never passes
    ]


def expected(saes, streams, spec_list):
    """(edited stream per layer, per request [tokens, passed per gate]) by the definition."""
    starts = np.cumsum([0, *ROWS])
    out = {layer: streams[layer][0].clone() for layer in (0, 1)}
    counts = []
    for i, spec in enumerate(spec_list):
        r = slice(starts[i], starts[i + 1])
        passed = {}
        for gate in spec.gates:  # each read on its layer's stream as it arrived there (unedited)
            a = dense(saes[gate.layer], *streams[gate.layer])[r, gate.index]
            lower, upper = gate.bounds
            passed[gate] = ((a > lower) & (a < upper)).float()
        counts.append([ROWS[i]] + [int(passed[gate].sum()) for gate in spec.gates])
        for layer in (0, 1):
            hidden, residual = streams[layer]
            f = dense(saes[layer], hidden, residual)[r]
            delta = torch.zeros(ROWS[i], D_MODEL)
            for e in spec.features:
                if e.layer != layer:
                    continue
                a = f[:, e.index]
                coef = {"add": torch.full_like(a, e.value), "clamp": e.value - a, "ablate": -a,
                        "scale": (e.value - 1) * a}[e.mode]
                if e.when is not None:
                    coef = coef * passed[e.when]
                delta += coef[:, None] * saes[layer].W_dec[e.index].float()
            out[layer][r] = (hidden[r].float() + delta).to(hidden.dtype)
    return out, counts


def run(kernel: str, saes, streams, spec_list):
    """The edited stream per layer and the gate reports, through a SteeringRuntime."""
    runtime = SteeringRuntime(PluginConfig("mem", (0, 1), max_features=8, max_configs=8, steering_kernel=kernel),
                              saes, torch.device("cpu"), max_rows=64)
    views = [RequestView(f"r{i}", {EXTRA_ARGS_KEY: s.to_extra_arg(), GATE_REPORT_KEY: report_extra_arg(f"g{i}")},
                         n, 0, 100) for i, (s, n) in enumerate(zip(spec_list, ROWS))]
    views.append(RequestView("plain", {}, ROWS[-1], 0, 100))
    runtime.begin_step(RequestView.batch(views))
    out = {}
    for layer in (0, 1):
        hidden, residual = streams[layer]
        out[layer] = hidden.clone()
        runtime.apply(layer, out[layer], residual)
    runtime.end_step()
    reports = [runtime.gate_reports.take(f"g{i}") for i in range(len(spec_list))]
    return out, [[r["tokens"], *r["passed"]] if r else None for r in reports]  # None: a spec without gates


def gated_results(kernel: str) -> list[dict]:
    """Per activation: max |server - definition| per layer, the counts, and sanity flags.
    Shared with the Triton interpreter test."""
    results = []
    for activation in ("topk", "relu", "jumprelu"):
        saes, streams = inputs(activation)
        if kernel == "native":
            for sae in saes.values():
                sae.choose_cpu_encoder()
        spec_list = specs(saes, streams)
        want, want_counts = expected(saes, streams, spec_list)
        got, counts = run(kernel, saes, streams, spec_list)
        plain = slice(sum(ROWS[:-1]), sum(ROWS))
        results.append(dict(
            activation=activation,
            max_abs=max(float((got[layer] - want[layer]).abs().max()) for layer in (0, 1)),
            counts=counts, expected_counts=want_counts,
            plain_untouched=all(torch.equal(got[layer][plain], streams[layer][0][plain]) for layer in (0, 1)),
        ))
    return results


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_gated_edits_follow_the_definition(kernel):
    for r in gated_results(kernel):
        assert r["max_abs"] <= 1e-4, r
        assert r["counts"] == r["expected_counts"], r
        assert r["plain_untouched"], r
        # not vacuous: each of the first three specs' gates passes on some rows and fails on others
        for tokens, *passed in r["counts"][:3]:
            assert all(0 < p < tokens for p in passed), r
        assert r["counts"][3][1] == 0


def test_a_gate_that_never_passes_leaves_the_stream_alone():
    saes, streams = inputs("topk")
    spec = SteeringSpec.create([FeatureEdit(0, 3, "clamp", 50.0, Gate(0, 3, above=1e6)),
                                FeatureEdit(1, 4, "add", 9.0, Gate(0, 3, above=1e6))])
    runtime = SteeringRuntime(PluginConfig("mem", (0, 1), max_features=8, steering_kernel="native"), saes,
                              torch.device("cpu"), max_rows=16)
    runtime.begin_step(RequestView.batch([RequestView("r", {EXTRA_ARGS_KEY: spec.to_extra_arg()}, 4, 0, 2)]))
    for layer in (0, 1):
        hidden = streams[layer][0][:4].clone()
        runtime.apply(layer, hidden, streams[layer][1][:4])
        assert torch.equal(hidden, streams[layer][0][:4])
    runtime.end_step()


def test_gate_spec_round_trips_and_keeps_ungated_ids():
    ungated = SteeringSpec.create([FeatureEdit(1, 3, "clamp", 2.0)])
    assert ungated.canonical_json() == '{"apply_to":"all","features":[{"index":3,"layer":1,"mode":"clamp","value":2.0}]}'
    gated = SteeringSpec.create([FeatureEdit(1, 3, "clamp", 2.0, Gate(0, 7, above=0.5)),
                                 FeatureEdit(1, 4, "add", 1.0, Gate(0, 7, above=0.5)),
                                 FeatureEdit(1, 5, "add", 1.0, Gate(1, 2, below=3.0))])
    assert gated.gates == (Gate(0, 7, 0.5, None), Gate(1, 2, None, 3.0))
    assert SteeringSpec.from_extra_arg(gated.to_extra_arg()) == gated
    assert gated.id != SteeringSpec.create([FeatureEdit(1, 3, "clamp", 2.0, Gate(0, 7, above=0.6)),
                                            FeatureEdit(1, 4, "add", 1.0, Gate(0, 7, above=0.5)),
                                            FeatureEdit(1, 5, "add", 1.0, Gate(1, 2, below=3.0))]).id
    assert gated.echo()["features"][0]["when"] == {"layer": 0, "index": 7, "above": 0.5}
    for bad in ({"layer": 0, "index": 1}, {"layer": 0, "index": 1, "above": 2.0, "below": 1.0},
                {"layer": 0, "index": 1, "above": float("nan")}):
        with pytest.raises(ValueError):
            Gate.from_json(bad)


def test_a_gate_on_another_pipeline_stage_is_refused_by_the_api():
    from steerserve.errors import APIError
    from steerserve.steering.schema import parse_steering

    raw = {"features": [{"layer": 2, "index": 1, "mode": "add", "value": 1.0,
                         "when": {"layer": 1, "index": 1, "above": 0.5}}]}
    spec, _ = parse_steering(raw, {1: 8, 2: 8}, 4, 100.0, (frozenset({1, 2}),))
    assert spec.features[0].when == Gate(1, 1, above=0.5)
    with pytest.raises(APIError) as refused:
        parse_steering(raw, {1: 8, 2: 8}, 4, 100.0, (frozenset({1}), frozenset({2})))
    assert (refused.value.param, refused.value.code) == ("steering.features[0].when.layer", "invalid_gate")
