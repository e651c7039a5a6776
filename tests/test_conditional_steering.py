"""Conditional steering (`when` gates) end to end: the compiled server against the independent
reference (tests/hf_reference.py evaluates each gate with its own hook), every mode gated, gates
at the edited layer and at an earlier one, the gate report in the JSON echo and in the stream's
last chunk, mixed batches, and the 400s of bad gates. One shared server (conftest.py).

Gate thresholds of 0.5 sit far from every activation on these prompts (the tiny SAEs' active
features read 1.0 or more, the rest 0), so bf16 differences between the stacks cannot flip one.
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import MODEL_NAME, PROMPT, metric, run_together, v1_only
from tests.test_differential import LOGPROB_TOLERANCE, MAX_TOKENS, assert_server_matches_reference, server_greedy


def f(layer, index, mode, value=None, when=None):
    return {"layer": layer, "index": index, "mode": mode} | ({} if value is None else {"value": value}) | (
        {} if when is None else {"when": when})


def gated_cases(active):
    a1, a2 = active[1], active[2]
    fires = {"layer": 1, "index": a1[1], "above": 0.5}  # active on about half the tokens
    quiet = {"layer": 1, "index": a1[1], "below": 0.5}
    return {
        "add-same-layer": {"features": [f(1, 3, "add", 8.0, fires)]},
        "clamp-earlier-layer": {"features": [f(2, a2[1], "clamp", 6.0, fires)]},
        "scale-below": {"features": [f(1, a1[2], "scale", 8.0, quiet)]},
        # layer 1's feature 3, added, drives layer 2's feature 416: ablating that undoes the add,
        # here only where the gate lets it
        "ablate-beside-ungated": {"features": [f(1, 3, "add", 8.0), f(2, 416, "ablate", when=quiet)]},
        "two-gates-generation-only": {"features": [f(1, 3, "add", 10.0, fires), f(2, 9, "add", -6.0, quiet)],
                                      "apply_to": "generation"},
    }


def ungated(steering):
    return steering | {"features": [{k: v for k, v in e.items() if k != "when"} for e in steering["features"]]}


@pytest.fixture(scope="module")
def cases(active_features):
    return gated_cases(active_features)


@pytest.mark.parametrize("name", list(gated_cases({1: [0, 1, 2], 2: [0, 1]})))
def test_gated_edits_match_the_reference(runner_server, runner_client, reference, cases, name):
    if name != "two-gates-generation-only":
        v1_only(runner_server, "V2 checks gates with the two-gate case, which gates at both layers")
    assert_server_matches_reference(runner_client, reference, cases[name])


def test_gates_change_the_outcome(client, cases):
    """Not vacuous: each gated case differs from the same edits ungated and from no steering, in
    its tokens or by more than the differential tolerance in their log-probabilities."""

    def differ(a, b):
        return a[0] != b[0] or max(abs(x - y) for x, y in zip(a[1], b[1])) > 2 * LOGPROB_TOLERANCE

    plain = server_greedy(client, None)[1:]
    for name, steering in cases.items():
        gated = server_greedy(client, steering)[1:]
        assert differ(gated, plain), name
        assert differ(gated, server_greedy(client, ungated(steering))[1:]), name


def chat(client, steering, **kwargs):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"steering": steering, "return_token_ids": True, "ignore_eos": True,
                    "cache_salt": uuid.uuid4().hex},  # no prefix-cache hits: every token is computed here
        **kwargs)


def expected_report(reference, steering, prompt_ids, tokens):
    """Tokens computed (the prompt and every generated token fed back) and, per gated feature,
    how many of them pass its gate, from the reference's own stream. Only for gates on a
    layer with no edit of its own (there the captured stream is the one the gate read)."""
    edited_layers = {e["layer"] for e in steering["features"]}
    sequence = prompt_ids + tokens[:-1]
    _, streams = reference.forward(sequence, steering["features"], capture=True)
    counts = []
    for e in steering["features"]:
        gate = e["when"]
        assert gate["layer"] not in edited_layers
        a = reference.encode(gate["layer"], streams[gate["layer"]])[:, gate["index"]]
        ok = (a > gate.get("above", float("-inf"))) & (a < gate.get("below", float("inf")))
        counts.append(int(ok.sum()))
    return len(sequence), counts


def test_the_echo_reports_how_many_tokens_each_gate_let_through(client, reference, active_features):
    a1, a2 = active_features[1], active_features[2]
    steering = {"features": [f(2, a2[1], "clamp", 6.0, {"layer": 1, "index": a1[1], "above": 0.5}),
                             f(2, 9, "add", -3.0, {"layer": 1, "index": a1[1], "below": 0.5})]}
    response = chat(client, steering)
    echo = response.model_extra["steering"]
    tokens = list(response.choices[0].model_extra["token_ids"])
    computed, passed = expected_report(reference, steering, response.model_extra["prompt_token_ids"], tokens)
    assert echo["steered_tokens"] == computed
    by_index = {e["index"]: e for e in echo["features"]}  # the echo lists features in canonical order
    assert [by_index[e["index"]]["edited_tokens"] for e in steering["features"]] == passed
    assert 0 < passed[0] < computed and passed[0] + passed[1] == computed  # above and below 0.5 split them
    assert by_index[a2[1]]["when"] == {"layer": 1, "index": a1[1], "above": 0.5}

    # streamed: every chunk echoes the spec; one last chunk, with no choices, carries the counts
    chunks = list(chat(client, steering, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == response.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.id == chunks[0].id
    assert last.model_extra["steering"] == echo
    assert all("steered_tokens" not in c.model_extra["steering"] for c in chunks[:-1])


def test_ungated_specs_report_nothing(client):
    echo = chat(client, {"features": [f(1, 3, "add", 8.0)]}).model_extra["steering"]
    assert "steered_tokens" not in echo and "edited_tokens" not in echo["features"][0]


def test_mixed_batch_of_gated_ungated_and_unsteered(server, client, cases):
    """Concurrent requests share steps; each gets exactly what it gets alone, its own gate
    report among it, though reports of requests that finish in the same step are taken in one
    RPC (how many RPCs depends on how the requests' steps fell: test_traces pins the coalescing
    with streams, which take a piece every step)."""
    specs = [cases["clamp-earlier-layer"], ungated(cases["clamp-earlier-layer"]), None,
             cases["two-gates-generation-only"], cases["scale-below"], None]

    def tokens_and_echo(c, steering):
        response = chat(c, steering) if steering else c.chat.completions.create(
            model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True})
        return list(response.choices[0].model_extra["token_ids"]), response.model_extra.get("steering")

    alone = [tokens_and_echo(client, s) for s in specs]
    assert [s is not None and "steered_tokens" in s for _, s in alone] == [True, False, False, True, True, False]
    takes = metric(server, "steerserve_worker_takes_total")
    together, steps = run_together(server, tokens_and_echo, specs * 2)
    assert together == alone * 2
    # one after another they would take 12 x MAX_TOKENS steps; prompts prefill in 128-token chunks
    assert steps <= 3 * MAX_TOKENS, f"{steps} engine steps for 12 requests of {MAX_TOKENS} tokens: not one batch"
    # a gate report per gated request (6) and a refusal check per steered one (8, those unsteered take nothing)
    assert metric(server, "steerserve_worker_takes_total") - takes == 6 + 8


def feature(**gate):
    return {"features": [{"layer": 2, "index": 5, "mode": "add", "value": 1.0, "when": gate}]}


@pytest.mark.parametrize("steering,param,code", [
    (feature(layer=2, index=5), "steering.features[0].when", "invalid_gate"),
    (feature(layer=3, index=5, above=1.0), "steering.features[0].when.layer", "layer_not_loaded"),
    ({"features": [{"layer": 1, "index": 5, "mode": "add", "value": 1.0,
                    "when": {"layer": 2, "index": 5, "above": 1.0}}]}, "steering.features[0].when.layer",
     "invalid_gate"),
    (feature(layer=1, index=1024, above=1.0), "steering.features[0].when.index", "index_out_of_range"),
    (feature(layer=1, index=-1, above=1.0), "steering.features[0].when.index", "index_out_of_range"),
    (feature(layer=1, index=5, above=2.0, below=1.0), "steering.features[0].when.below", "invalid_gate"),
    (feature(layer=1, index=5, above=1.0, below=1.0), "steering.features[0].when.below", "invalid_gate"),
    (feature(layer=1, index=5, above="1"), "steering.features[0].when.above", "invalid_steering"),
    (feature(layer=1, index=5, above=True), "steering.features[0].when.above", "invalid_steering"),
    (feature(layer=1, index=5, above=1.0, over=2), "steering.features[0].when.over", "invalid_steering"),
    ({"features": [{"layer": 2, "index": 5, "mode": "add", "value": 1.0, "when": [1, 5]}]},
     "steering.features[0].when", "invalid_steering"),
])
def test_bad_gates_get_a_400_naming_the_field(http, steering, param, code):
    response = http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2, "steering": steering})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_bounds_are_refused(http, raw):
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "steering": '
            '{"features": [{"layer": 2, "index": 5, "mode": "add", "value": 1.0, '
            '"when": {"layer": 1, "index": 5, "above": %s}}]}}' % (MODEL_NAME, raw))
    response = http.post("/v1/chat/completions", headers={"Content-Type": "application/json"}, content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("steering.features[0].when.above", "invalid_gate"), error
