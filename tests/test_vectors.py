"""Direction vectors (`steering.vectors`): the spec, and every backend's edit against the
definition (no vLLM engine).

Two steered layers; requests add, cap and ablate vectors, gated by a feature of the same layer
or of the earlier one, beside feature edits, in one step with an unsteered request. The
expected stream is computed here from the definition on the stream as it arrived at each
layer: add `x += value * v`; cap `x -= max(0, x . u - value) * u`; ablate `x -= (x . u) u`,
with u = v / |v|; a gated edit is multiplied by its gate's pass/fail. Cap values sit at the
median projection of the request's rows, so some rows are capped and some not.
tests/test_triton_kernel.py runs the same cases through the Triton kernels in the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerserve_sae.protocol.spec import (
    FeatureEdit, Gate, SteeringSpec, VectorEdit, decode_vector, encode_vector,
)
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY
from steerserve_sae.steering.runtime import SteeringRuntime
from steerserve_sae.protocol.plugin_config import PluginConfig
from tests.request_views import RequestView
from tests.test_cpu_kernel import D_MODEL
from tests.test_gating import ROWS, dense, inputs, run, split_threshold

def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D_MODEL).astype(np.float32)


def projections(streams, layer: int, v: np.ndarray, r: slice) -> torch.Tensor:
    hidden, residual = streams[layer]
    u = torch.from_numpy(v) / float(np.linalg.norm(v.astype(np.float64)))
    return (hidden[r].float() + residual[r].float()) @ u


def specs(saes, streams) -> list[SteeringSpec]:
    starts = np.cumsum([0, *ROWS])
    rows = [slice(starts[i], starts[i + 1]) for i in range(len(ROWS))]
    f0 = dense(saes[0], *streams[0])
    busy = int(((f0[rows[1]] > 0).sum(0) * 1000 + f0[rows[1]].sum(0)).argmax())
    gate = Gate(0, busy, above=split_threshold(f0[rows[1], busy]))
    busy2 = int(((f0[rows[2]] > 0).sum(0) * 1000 + f0[rows[2]].sum(0)).argmax())
    gate2 = Gate(0, busy2, below=split_threshold(f0[rows[2], busy2]))

    def cap_at_median(layer, v, r):
        return float(projections(streams, layer, v, r).median())

    def vec(layer, seed, mode, value=0.0, when=None):
        return VectorEdit(layer, encode_vector(vector(seed)), mode, value, when)

    v1, v2, v3 = vector(1), vector(2), vector(3)
    return [
        SteeringSpec.create([], vectors=[vec(0, 1, "cap", cap_at_median(0, v1, rows[0])), vec(1, 4, "add", 1.5),
                                         vec(1, 3, "ablate")]),
        SteeringSpec.create([FeatureEdit(0, 7, "clamp", 3.0), FeatureEdit(1, 9, "add", 2.0)],
                            vectors=[vec(0, 2, "ablate", when=gate), vec(0, 5, "add", -2.0, when=gate),
                                     vec(1, 3, "cap", cap_at_median(1, v3, rows[1]), when=gate)]),
        SteeringSpec.create([FeatureEdit(1, 11, "ablate", 0.0)],
                            vectors=[vec(1, 2, "cap", cap_at_median(1, v2, rows[2]), when=gate2),
                                     vec(0, 6, "add", 0.75)]),
        SteeringSpec.create([], "generation", [vec(1, 1, "ablate")]),  # prompt rows only: never applies
    ]


def expected(saes, streams, spec_list):
    """The edited stream per layer, by the definition."""
    starts = np.cumsum([0, *ROWS])
    out = {layer: streams[layer][0].clone() for layer in (0, 1)}
    for i, spec in enumerate(spec_list):
        if spec.apply_to != "all":
            continue
        r = slice(starts[i], starts[i + 1])
        passed = {}
        for gate in spec.gates:
            a = dense(saes[gate.layer], *streams[gate.layer])[r, gate.index]
            lower, upper = gate.bounds
            passed[gate] = ((a > lower) & (a < upper)).float()
        for layer in (0, 1):
            hidden, residual = streams[layer]
            f = dense(saes[layer], hidden, residual)[r]
            delta = torch.zeros(ROWS[i], D_MODEL)
            for e in (*spec.features, *spec.vectors):
                if e.layer != layer:
                    continue
                if isinstance(e, FeatureEdit):
                    a = f[:, e.index]
                    coef = {"add": torch.full_like(a, e.value), "clamp": e.value - a, "ablate": -a,
                            "scale": (e.value - 1) * a}[e.mode]
                    direction = saes[layer].W_dec[e.index].float()
                else:
                    v = decode_vector(e.vector)
                    p = projections(streams, layer, v, r)
                    if e.mode == "add":
                        coef, direction = torch.full_like(p, e.value), torch.from_numpy(v)
                    else:
                        coef = -p if e.mode == "ablate" else -torch.clamp(p - e.value, min=0.0)
                        direction = torch.from_numpy(v) / float(np.linalg.norm(v.astype(np.float64)))
                if e.when is not None:
                    coef = coef * passed[e.when]
                delta += coef[:, None] * direction
            out[layer][r] = (hidden[r].float() + delta).to(hidden.dtype)
    return out


def vector_results(kernel: str) -> list[dict]:
    """Per activation: max |backend - definition| and sanity flags. Shared with the Triton
    interpreter test."""
    results = []
    for activation in ("topk", "relu"):
        saes, streams = inputs(activation)
        if kernel == "native":
            for sae in saes.values():
                sae.choose_cpu_encoder()
        spec_list = specs(saes, streams)
        want = expected(saes, streams, spec_list)
        got = run(kernel, saes, streams, spec_list)[0]
        untouched = slice(sum(ROWS[:3]), sum(ROWS))  # the generation-only request and the unsteered one
        results.append(dict(
            activation=activation,
            max_abs=max(float((got[layer] - want[layer]).abs().max()) for layer in (0, 1)),
            steered=all(not torch.equal(got[layer][: sum(ROWS[:3])], streams[layer][0][: sum(ROWS[:3])])
                        for layer in (0, 1)),
            untouched=all(torch.equal(got[layer][untouched], streams[layer][0][untouched]) for layer in (0, 1)),
        ))
    return results


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_vector_edits_follow_the_definition(kernel):
    for r in vector_results(kernel):
        assert r["max_abs"] <= 1e-4 and r["steered"] and r["untouched"], r


def vector_only_layer_result(kernel: str) -> dict:
    """Layer 1 steered by vectors only (--steering-layers): no SAE there, the same edits as at an
    SAE layer (gated by a layer-0 feature too), feature edits at layer 0 beside them, and a
    request with a feature at layer 1, which the worker refuses. Shared with the Triton
    interpreter test."""
    saes, streams = inputs("topk")
    if kernel == "native":
        saes[0].choose_cpu_encoder()
    spec_list = [SteeringSpec.create([f for f in s.features if f.layer == 0], s.apply_to, list(s.vectors))
                 for s in specs(saes, streams)]
    assert any(v.layer == 1 and v.when is not None for s in spec_list for v in s.vectors)
    runtime = SteeringRuntime(PluginConfig("mem", (0,), max_features=8, max_configs=8, steering_kernel=kernel,
                                           steering_layers=(1,)), {0: saes[0]}, torch.device("cpu"), max_rows=64)
    views = [RequestView(f"r{i}", {EXTRA_ARGS_KEY: s.to_extra_arg()}, n, 0, 100)
             for i, (s, n) in enumerate(zip(spec_list, ROWS))]
    feature_there = SteeringSpec.create([FeatureEdit(1, 3, "add", 1.0)])
    views += [RequestView("plain", {}, ROWS[-1], 0, 100),
              RequestView("refused", {EXTRA_ARGS_KEY: feature_there.to_extra_arg()}, 1, 0, 100)]
    runtime.begin_step(RequestView.batch(views))
    want = expected(saes, streams, spec_list)
    result = dict(rejected=runtime.rejected_requests_total, vector_layers=runtime.stats()["vector_layers"],
                  max_abs=0.0, refused_untouched=True, steered=True)
    for layer in (0, 1):
        hidden, residual = streams[layer]
        got = torch.cat([hidden, hidden[:1]]).clone()  # the refused request's row: never edited
        runtime.apply(layer, got, torch.cat([residual, residual[:1]]))
        result["max_abs"] = max(result["max_abs"], float((got[:-1] - want[layer]).abs().max()))
        result["refused_untouched"] &= torch.equal(got[-1], hidden[0])
        result["steered"] &= not torch.equal(got[: ROWS[0]], hidden[: ROWS[0]])
    runtime.end_step()
    return result


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_a_layer_without_an_sae_takes_vector_edits(kernel):
    r = vector_only_layer_result(kernel)
    assert r["rejected"] == 1 and r["vector_layers"] == [1], r
    assert r["max_abs"] <= 1e-4 and r["refused_untouched"] and r["steered"], r


def test_cap_moves_only_the_rows_above_the_cap():
    saes, streams = inputs("relu")
    v = vector(1)
    r = slice(0, ROWS[0])
    before = projections(streams, 0, v, r)
    cap = float(before.median())
    spec = SteeringSpec.create([], vectors=[VectorEdit(0, encode_vector(v), "cap", cap)])
    got = run("native", saes, streams, [spec])[0][0]
    after = projections({0: (got, streams[0][1])}, 0, v, r)
    torch.testing.assert_close(after, torch.clamp(before, max=cap), atol=1e-4, rtol=0)
    assert (before > cap).any() and (before < cap).any()


def test_spec_carries_vectors_in_its_id_and_round_trips():
    v = vector(7)
    features = [FeatureEdit(1, 3, "add", 2.0)]
    plain = SteeringSpec.create(features)
    assert "vectors" not in plain.canonical_json()  # feature-only ids are what they were
    a = SteeringSpec.create(features, vectors=[VectorEdit(1, encode_vector(v), "cap", 1.0),
                                               VectorEdit(1, encode_vector(-v), "ablate", 0.0)])
    b = SteeringSpec.create(features, vectors=[VectorEdit(1, encode_vector(-v), "ablate", 0.0),
                                               VectorEdit(1, encode_vector(v), "cap", 1.0)])
    assert a.id == b.id != plain.id
    assert a.id != SteeringSpec.create(features, vectors=[VectorEdit(1, encode_vector(v), "cap", 1.5),
                                                          VectorEdit(1, encode_vector(-v), "ablate", 0.0)]).id
    assert SteeringSpec.from_extra_arg(a.to_extra_arg()) == a
    echo = a.echo()["vectors"]
    assert [e["mode"] for e in echo] == ["ablate", "cap"] and "value" not in echo[0] and echo[1]["value"] == 1.0
    assert echo[0]["norm"] == pytest.approx(float(np.linalg.norm(v)), rel=1e-6)
    assert echo[0]["vector_id"] != echo[1]["vector_id"] and echo[0]["vector_id"].startswith("vec-")


def test_workers_refuse_vectors_that_do_not_fit():
    saes, streams = inputs("relu")
    runtime = SteeringRuntime(PluginConfig("mem", (0, 1), max_features=8, max_vectors=2, steering_kernel="torch"),
                              saes, torch.device("cpu"), max_rows=16)
    short = SteeringSpec.create([], vectors=[VectorEdit(0, encode_vector(np.ones(D_MODEL - 1, np.float32)), "add", 1.0)])
    many = SteeringSpec.create([], vectors=[VectorEdit(0, encode_vector(vector(i)), "add", 1.0) for i in range(3)])
    elsewhere = SteeringSpec.create([], vectors=[VectorEdit(5, encode_vector(vector(1)), "add", 1.0)])
    views = [RequestView(f"r{i}", {EXTRA_ARGS_KEY: s.to_extra_arg()}, 1, 0, 4)
             for i, s in enumerate((short, many, elsewhere))]
    runtime.begin_step(RequestView.batch(views))
    assert runtime.rejected_requests_total == 3
    hidden = streams[0][0][:3].clone()
    runtime.apply(0, hidden, streams[0][1][:3])
    assert torch.equal(hidden, streams[0][0][:3])
