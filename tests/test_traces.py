"""Feature traces while generating (`trace` on chat/text completions), end to end on the shared
compiled server, against the independent reference: for the tokens the server generated, the
reference recomputes each traced position's features (after any steering edit at that layer)
and the trace must be their top-k. Also: positions "all", n > 1, streams, compare, labels,
completions, and the 400s."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from tests.conftest import FEATURE_LABELS, MODEL_NAME, PROMPT, metric, run_together

MAX_TOKENS = 8
TOLERANCE = 0.06  # bf16 stream, two kernel stacks: activations agree to a few percent
LABELS = {(row["layer"], row["index"]): row["label"] for row in FEATURE_LABELS}


def chat(client, trace, steering=None, **kwargs):
    extra = {"trace": trace, "return_token_ids": True, "ignore_eos": True}
    if steering is not None:
        extra["steering"] = steering
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS,
                                          extra_body=extra, **kwargs)


def assert_trace_matches_reference(reference, trace, prompt_ids, tokens, layers, top_k, steering=None,
                                   first_position=None):
    """Each entry's features are the reference's top-k at its position: the values agree, and
    no feature outside the list is clearly larger than the list's smallest."""
    sequence = prompt_ids + tokens[:-1]  # every position the server computed
    first = len(prompt_ids) - 1 if first_position is None else first_position
    assert [e["position"] for e in trace] == list(range(first, len(sequence)))
    _, streams = reference.forward(sequence, (steering or {}).get("features"), capture=True)
    for layer in layers:
        f = reference.encode(layer, streams[layer])
        for entry in trace:
            features = entry["features"][str(layer)]
            assert len(features) == top_k
            row = f[entry["position"]]
            values = [x["activation"] for x in features]
            assert values == sorted(values, reverse=True)
            for x in features:
                assert abs(row[x["index"]] - x["activation"]) <= TOLERANCE * max(1.0, x["activation"]), (entry, layer)
                assert x.get("label") == LABELS.get((layer, x["index"]))
            others = row.clone()
            others[[x["index"] for x in features]] = -1
            assert float(others.max()) <= values[-1] + TOLERANCE * max(1.0, values[-1]), (entry, layer)


def test_a_trace_is_the_reference_features_of_the_generated_tokens(runner_client, reference):
    response = chat(runner_client, {"layers": [1, 2], "top_k": 5})
    choice = response.choices[0]
    tokens = list(choice.model_extra["token_ids"])
    trace = choice.model_extra["trace"]
    assert len(trace) == len(tokens) == MAX_TOKENS  # one entry per generated token: where it was predicted
    assert_trace_matches_reference(reference, trace, response.model_extra["prompt_token_ids"], tokens, [1, 2], 5)
    assert "steering" not in response.model_extra


def test_a_steered_trace_shows_the_edited_stream(client, reference, active_features):
    steering = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0},
                             {"layer": 2, "index": active_features[2][0], "mode": "clamp", "value": 20.0}]}
    response = chat(client, {"layers": [2], "top_k": 3}, steering)
    choice = response.choices[0]
    tokens = list(choice.model_extra["token_ids"])
    trace = choice.model_extra["trace"]
    assert_trace_matches_reference(reference, trace, response.model_extra["prompt_token_ids"], tokens, [2], 3,
                                   steering)
    clamped = [next((x for x in e["features"]["2"] if x["index"] == active_features[2][0]), None) for e in trace]
    assert all(x is not None and abs(x["activation"] - 20.0) < 1.0 for x in clamped)  # after the edit
    assert response.model_extra["steering"]["features"][0]["index"] == 3


def test_positions_all_covers_the_prompt(client, reference):
    response = chat(client, {"layers": [1], "top_k": 2, "positions": "all"})
    prompt_ids = response.model_extra["prompt_token_ids"]
    tokens = list(response.choices[0].model_extra["token_ids"])
    trace = response.choices[0].model_extra["trace"]
    assert len(trace) == len(prompt_ids) + len(tokens) - 1
    assert_trace_matches_reference(reference, trace, prompt_ids, tokens, [1], 2, first_position=0)


def test_residuals_are_the_reference_streams(client, reference, active_features):
    """`residuals` returns each traced position's stream at each layer (base64 float32), after
    the steering edit there: the reference's stream at the same positions, to bf16 precision;
    steered, the stream differs from the unsteered one where the edit applies."""
    steering = {"features": [{"layer": 2, "index": active_features[2][0], "mode": "clamp", "value": 12.0}]}
    response = chat(client, {"layers": [1, 2], "top_k": 2, "positions": "all", "residuals": True}, steering)
    prompt_ids = response.model_extra["prompt_token_ids"]
    tokens = list(response.choices[0].model_extra["token_ids"])
    trace = response.choices[0].model_extra["trace"]
    sequence = prompt_ids + tokens[:-1]
    assert [e["position"] for e in trace] == list(range(len(sequence)))
    _, steered = reference.forward(sequence, steering["features"], capture=True)
    _, plain = reference.forward(sequence, None, capture=True)
    for layer in (1, 2):
        served = torch.stack([torch.from_numpy(np.frombuffer(base64.b64decode(e["residuals"][str(layer)]), "<f4").copy())
                              for e in trace])
        assert served.shape == steered[layer].shape
        error = (served - steered[layer]).norm(dim=-1) / steered[layer].norm(dim=-1)
        assert float(error.max()) < 0.02, (layer, error)
    moved = (steered[2] - plain[2]).norm(dim=-1) / plain[2].norm(dim=-1)
    assert float(moved.max()) > 0.1  # so agreeing within 2% means the served residuals are the edited stream


@pytest.mark.parametrize("change,param,code", [
    ({"messages": [{"role": "user", "content": "rain " * 800}], "n": 3}, "trace.residuals",
     "invalid_trace"),  # (810 + 2) positions x 2 layers x 3 choices > 4096
    ({"chat_template_kwargs": "x"}, "messages", "invalid_request"),
    ({"messages": 5}, "messages", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x" * 200_000}]}, "messages", "too_many_tokens"),
])
def test_a_chat_prompt_is_counted_for_residuals_and_bad_ones_get_400s(http, change, param, code):
    """Residuals at all positions: the chat prompt's tokens are counted (vLLM's own rendering,
    through /tokenize) before the request runs; what it cannot render is a 400 naming the messages."""
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2,
            "trace": {"layers": [1, 2], "residuals": True, "positions": "all"}} | change
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    del body["trace"]["positions"]  # tracing only the generation needs no count
    ok = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2, "trace": body["trace"]} | (
        {"messages": body["messages"], "n": 3} if param == "trace.residuals" else {})  # its generation fits
    assert http.post("/v1/chat/completions", json=ok).status_code == 200  # and the server is up


@pytest.mark.parametrize("change", [
    {"chat_template_kwargs": {"tokenize": True}},  # vLLM sets its own
    {"messages": [{"role": "user"}]},  # vLLM renders a missing content as empty
])
def test_what_vllm_renders_is_counted_as_it_renders_it(http, change):
    """A chat request vLLM serves is served with residuals at all positions too (counted by its own
    renderer, not by a second template call that reads the messages differently), over exactly
    the prompt it ran."""
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2,
            "trace": {"layers": [1], "residuals": True, "positions": "all"}} | change
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage, trace = response.json()["usage"], response.json()["choices"][0]["trace"]
    assert [e["position"] for e in trace] == list(range(usage["prompt_tokens"] + usage["completion_tokens"] - 1))


@pytest.mark.parametrize("extra,prompt,param,code", [
    ({"n": 3}, None, "trace.residuals", "invalid_trace"),  # no max_tokens: the context counts, 1024 x 2 x 3
    ({"max_tokens": 1000, "n": 3}, None, "trace.residuals", "invalid_trace"),  # 1000 x 2 layers x 3 > 4096
    ({"max_tokens": 2, "n": 3, "positions": "all"}, [611] * 700, "trace.residuals", "invalid_trace"),  # 702 x 2 x 3
    ({"max_tokens": 2, "residuals": 1}, None, "trace.residuals", "invalid_trace"),
])
def test_residuals_are_bounded_before_the_request_runs(http, extra, prompt, param, code):
    extra = dict(extra)
    trace = {"layers": [1, 2], "residuals": extra.pop("residuals", True), **({"positions": extra.pop("positions")}
                                                                          if "positions" in extra else {})}
    body = {"model": MODEL_NAME, "prompt": prompt or "the weather", "trace": trace, **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    if prompt is not None:  # the prompt's tokens counted: tracing only the generation fits
        body["trace"] = {"layers": [1, 2], "residuals": True}
        assert http.post("/v1/completions", json=body).status_code == 200


def test_a_trace_of_more_choices_than_it_can_take_is_refused(http):
    """n: 129 with a trace answered 200 with no trace on choice 128 (issue 21)."""
    body = {"model": MODEL_NAME, "prompt": "the weather", "max_tokens": 1, "trace": {"layers": [1]}}
    for n in (129, "129"):  # vLLM reads "129" as 129
        response = http.post("/v1/completions", json={**body, "n": n})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("n", "invalid_trace") and "at most 128" in error["message"]


def test_residuals_count_the_token_budget_vllm_applies(http):
    """max_tokens 2000 with max_completion_tokens 1 on completions: the bound counted 1 token
    while vLLM (which reads only max_tokens there) generated 2000, and the trace carried 3
    residual vectors for 2000 entries without saying so (issue 21)."""
    trace = {"layers": [1, 2], "residuals": True}
    body = {"model": MODEL_NAME, "prompt": "the weather", "max_tokens": 12, "max_completion_tokens": 1,
            "ignore_eos": True, "temperature": 0, "trace": trace}
    response = http.post("/v1/completions", json=body).json()
    assert response["usage"]["completion_tokens"] == 12
    entries = response["choices"][0]["trace"]
    assert len(entries) == 12 and all(set(e["residuals"]) == {"1", "2"} for e in entries)
    assert all(isinstance(v, str) and v for e in entries for v in e["residuals"].values())
    for route, fields in (("/v1/completions", {"prompt": "the weather", "max_tokens": 700, "max_completion_tokens": 1}),
                          ("/v1/chat/completions", {"messages": PROMPT, "max_tokens": 700, "max_completion_tokens": None}),
                          ("/v1/chat/completions", {"messages": PROMPT, "max_tokens": 1, "max_completion_tokens": 700})):
        refused = http.post(route, json={"model": MODEL_NAME, "n": 3, "trace": trace, **fields})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("trace.residuals", "invalid_trace")
        assert "up to 4200 residual vectors" in error["message"]  # 700 x 2 layers x 3 choices


def test_residual_bound_reads_each_field_as_vllm_does():
    from steerserve.errors import APIError
    from steerserve.steering.traces import parse_trace

    def positions(body: dict, prompt_tokens: int | None = None, max_model_len: int | None = None,
                  **trace) -> int | tuple[str | None, str]:
        try:
            return parse_trace({"layers": [1, 2], "residuals": True, **trace}, {1: 64, 2: 64}, body, 256, 4096,
                               prompt_tokens, max_model_len)._residual_positions
        except APIError as refused:
            return refused.param, refused.code

    chat = {"messages": []}
    assert positions({"max_tokens": 2000, "max_completion_tokens": 1}) == 2000  # completions read max_tokens only
    assert positions({**chat, "max_tokens": 2000, "max_completion_tokens": 1}) == 1  # chat reads max_completion_tokens
    assert positions({**chat, "max_tokens": 700, "max_completion_tokens": None}) == 700  # null: max_tokens
    assert positions({"max_tokens": "30"}) == 30  # vLLM reads "30" as 30
    assert positions({"max_tokens": "x"}) == ("trace.residuals", "invalid_trace")
    assert positions({}) == ("trace.residuals", "invalid_trace")  # no field, no known context
    assert positions({}, max_model_len=1024) == 1024  # the context is the budget
    assert positions({"n": 3}, max_model_len=1024) == ("trace.residuals", "invalid_trace")
    assert positions({"max_tokens": 300}, 900, 1024) == 124  # the context left after the prompt
    assert positions({"max_tokens": 300}, 900, 1024, positions="all") == 1024
    assert positions({"max_tokens": 683, "n": "3"}) == ("trace.residuals", "invalid_trace")  # 683 x 2 x 3 > 4096
    assert positions({"max_tokens": 1, "n": 129}) == ("n", "invalid_trace")


def test_each_choice_has_its_own_trace(client, reference):
    response = chat(client, {"layers": [1], "top_k": 3}, n=4, temperature=2.0)  # no seed: the children differ
    assert len({tuple(c.model_extra["token_ids"]) for c in response.choices}) > 1  # the choices differ
    for choice in response.choices:
        tokens = list(choice.model_extra["token_ids"])
        assert len(choice.model_extra["trace"]) == len(tokens)
        assert_trace_matches_reference(reference, choice.model_extra["trace"], response.model_extra["prompt_token_ids"],
                                       tokens, [1], 3)


def test_a_stream_carries_the_trace_with_its_chunks(client):
    """Each chunk carries the entries recorded since the previous one; over the stream (the last
    chunk before [DONE] has the rest) they add up to the JSON response's trace."""
    trace = {"layers": [1, 2], "top_k": 4}
    whole = chat(client, trace)
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"trace": trace, "ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert [c.index for c in last.choices] == [0] and last.choices[0].delta.content is None
    pieces = [c.choices[0].model_extra["trace"] for c in chunks if c.choices]
    assert pieces[0]  # delivered along the way (the first chunk already has its token's entry), not only at the end
    streamed = [entry for piece in pieces for entry in piece]
    expected = whole.choices[0].model_extra["trace"]
    assert [e["position"] for e in streamed] == [e["position"] for e in expected]
    assert [[x["index"] for x in e["features"]["1"]] for e in streamed] == \
        [[x["index"] for x in e["features"]["1"]] for e in expected]


def test_concurrent_traced_streams_take_their_pieces_together(server, client):
    """8 traced streams at once: each stream's pieces add up to the trace it gets alone, and
    the pieces all streams ask for in the same step go to the workers in one RPC
    (server/steerserve/steering/worker_takes.py) instead of one RPC per stream per token."""
    trace = {"layers": [1, 2], "top_k": 4}
    expected = [[x["index"] for x in e["features"]["2"]] for e in chat(client, trace).choices[0].model_extra["trace"]]

    def stream(c, _):
        chunks = c.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, extra_body={"trace": trace, "ignore_eos": True})
        return [[x["index"] for x in e["features"]["2"]]
                for chunk in chunks if chunk.choices for e in chunk.choices[0].model_extra["trace"]]

    takes, rpcs = metric(server, "steerserve_worker_takes_total"), metric(server, "steerserve_worker_take_rpcs_total")
    streamed, _ = run_together(server, stream, range(8))
    assert streamed == [expected] * 8
    takes, rpcs = metric(server, "steerserve_worker_takes_total") - takes, \
        metric(server, "steerserve_worker_take_rpcs_total") - rpcs
    assert takes >= 8 * 2  # pieces along the way (about one per token), not only the end
    # one RPC per piece without coalescing; 14-18 RPCs for 56 pieces in most runs here, at
    # worst 30 for 60 when the streams' steps fell apart
    assert rpcs <= 0.75 * takes, f"{takes} trace pieces taken in {rpcs} RPCs: not coalesced"


def test_compare_traces_both_answers(client):
    steering = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}], "compare": True}
    response = chat(client, {"layers": [1], "top_k": 2}, steering)
    steered, baseline = response.choices[0].model_extra["trace"], response.model_extra["baseline"]["choices"][0]["trace"]
    assert len(steered) == len(baseline) == MAX_TOKENS
    plain = chat(client, {"layers": [1], "top_k": 2}).choices[0].model_extra["trace"]
    assert baseline == plain and steered != plain


def test_completions_trace_and_labels(http):
    response = http.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": "The weather today is", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
        "trace": {"layers": [1], "top_k": 8}})
    assert response.status_code == 200, response.text
    trace = response.json()["choices"][0]["trace"]
    assert len(trace) == 4
    labelled = [x for e in trace for x in e["features"]["1"] if "label" in x]
    assert all(x["label"] == LABELS[(1, x["index"])] for x in labelled)


@pytest.mark.parametrize("body,param,code", [
    ({"trace": {"layers": []}}, "trace.layers", "invalid_trace"),
    ({"trace": {"layers": [3]}}, "trace.layers[0]", "layer_not_loaded"),
    ({"trace": {"layers": [1, 1]}}, "trace.layers[1]", "invalid_trace"),
    ({"trace": {"layers": [1], "top_k": 0}}, "trace.top_k", "invalid_trace"),
    ({"trace": {"layers": [1], "top_k": 101}}, "trace.top_k", "invalid_trace"),
    ({"trace": {"layers": [1], "positions": "prompt"}}, "trace.positions", "invalid_trace"),
    ({"trace": {"layers": ["1"]}}, "trace.layers[0]", "invalid_trace"),
    ({"trace": {"layers": [1], "residual": True}}, "trace.residual", "invalid_trace"),
    ({"trace": [1]}, "trace", "invalid_trace"),
])
def test_bad_traces_get_a_400_naming_the_field(http, body, param, code):
    response = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error


def test_trace_refuses_several_prompts_and_other_routes(http):
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": ["a", "b"], "max_tokens": 2,
                                                  "trace": {"layers": [1]}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = http.post("/v1/responses", json={"model": MODEL_NAME, "input": "hi", "trace": {"layers": [1]}})
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("trace", "steering_unsupported_route")


def test_a_trace_over_the_per_position_limit_is_refused():
    from steerserve.errors import APIError
    from steerserve.steering.traces import parse_trace

    sizes = {1: 1024, 2: 1024}
    assert parse_trace({"layers": [1, 2], "top_k": 5}, sizes, {}, 10).top_k == 5
    with pytest.raises(APIError) as refused:
        parse_trace({"layers": [1, 2], "top_k": 6}, sizes, {}, 10)
    assert (refused.value.param, refused.value.code) == ("trace.top_k", "invalid_trace")
    assert "--max-trace-features" in str(refused.value)


def test_residual_vectors_count_positions_layers_choices_and_compare():
    from steerserve.errors import APIError
    from steerserve.steering.traces import parse_trace

    sizes = {1: 64, 2: 64}

    def positions(trace: dict, body: dict, prompt_tokens: int | None = None) -> int | str:
        try:
            return parse_trace({"layers": [1, 2], "residuals": True, **trace}, sizes, body, 256, 4096,
                               prompt_tokens)._residual_positions
        except APIError as refused:
            assert (refused.param, refused.code) == ("trace.residuals", "invalid_trace")
            return "400"

    assert positions({}, {"max_tokens": 1024}) == 1024  # 2 layers x 1024 x 1 = 2048
    assert positions({}, {"max_tokens": 2049}) == "400"
    assert positions({}, {"messages": [], "max_completion_tokens": 512, "n": 4}) == 512  # 4096
    assert positions({}, {"max_tokens": 513, "n": 4}) == "400"
    assert positions({}, {"max_tokens": 1024, "steering": {"features": [], "compare": True}}) == 1024  # 4096
    assert positions({}, {"max_tokens": 1025, "steering": {"features": [], "compare": True}}) == "400"
    assert positions({"positions": "all"}, {"max_tokens": 8}, 2000) == 2008
    assert positions({"positions": "all"}, {"max_tokens": 8}, 2041) == "400"
    assert positions({"positions": "generation"}, {"max_tokens": 8}, 2041) == 8  # the prompt does not count
    assert positions({"residuals": False}, {}) == 0
