"""Inline `steering` on the Responses API (/v1/responses, through the official `openai` client)
and Anthropic's Messages API (/v1/messages, through the `anthropic` client): the same greedy
tokens and gate counts as chat completions for the same chat and spec, streamed and not, the
echo in each API's own objects, and the 400s. One shared server (conftest.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import API_KEY, MODEL_NAME, PROMPT

MAX_TOKENS = 8
STEER = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}
TEXT = PROMPT[0]["content"]


def chat(client, steering):
    response = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS,
                                              temperature=0, extra_body={"steering": steering})
    return response.choices[0].message.content, response.model_extra["steering"]


def responses(client, steering, stream=False):
    """The output text and the `steering` of the response object (a stream's: per event that carries one)."""
    kwargs = dict(model=MODEL_NAME, input=PROMPT, max_output_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"steering": steering})
    if not stream:
        response = client.responses.create(**kwargs)
        return response.output_text, response.model_extra.get("steering")
    text, echoes = "", {}
    for event in client.responses.create(stream=True, **kwargs):
        if event.type == "response.output_text.delta":
            text += event.delta
        if hasattr(event, "response"):
            echoes[event.type] = event.response.model_extra.get("steering")
    return text, echoes


@pytest.fixture(scope="module")
def anthropic_client(server):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=server.base_url, auth_token=API_KEY, max_retries=0, timeout=300)


def messages(anthropic_client, steering, stream=False):
    kwargs = dict(model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS,  # this client has no `temperature`
                  extra_body={"temperature": 0} | ({} if steering is None else {"steering": steering}))
    if not stream:
        message = anthropic_client.messages.create(**kwargs)
        return "".join(block.text for block in message.content), message.model_extra.get("steering")
    text, echoes = "", {}
    with anthropic_client.messages.create(stream=True, **kwargs) as events:
        for event in events:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
            if event.type == "message_start":
                echoes["message_start"] = event.message.model_extra.get("steering")
            if event.type == "message_delta":
                echoes["message_delta"] = event.model_extra.get("steering")
    return text, echoes


@pytest.fixture(scope="module")
def gated(active_features):
    """An add gated on a feature active on about half the tokens (as in test_conditional_steering)."""
    return {"features": [{**STEER["features"][0], "when": {"layer": 1, "index": active_features[1][1], "above": 0.5}}]}


@pytest.fixture(scope="module")
def chat_steered(client, gated):
    return {name: chat(client, spec) for name, spec in (("add", STEER), ("gated", gated))}


def test_responses_steer_like_chat(client, chat_steered):
    text, echo = chat_steered["add"]
    assert responses(client, STEER) == (text, echo)
    streamed, echoes = responses(client, STEER, stream=True)
    assert streamed == text
    assert "response.created" in echoes and "response.completed" in echoes
    assert all(e == echo for e in echoes.values()), echoes
    assert responses(client, None)[0] != text


def test_responses_gate_counts_equal_chat(client, chat_steered, gated):
    text, echo = chat_steered["gated"]
    assert echo["steered_tokens"] > 0 and echo["features"][0]["edited_tokens"] > 0
    assert responses(client, gated) == (text, echo)
    streamed, echoes = responses(client, gated, stream=True)
    assert streamed == text and echoes["response.completed"] == echo
    assert echoes["response.created"]["id"] == echo["id"] and "steered_tokens" not in echoes["response.created"]


def test_messages_steer_like_chat(anthropic_client, chat_steered, gated):
    text, echo = chat_steered["add"]
    assert messages(anthropic_client, STEER) == (text, echo)
    assert messages(anthropic_client, STEER, stream=True) == (text, {"message_start": echo, "message_delta": echo})
    plain = messages(anthropic_client, None)
    assert plain[1] is None and plain[0] != text
    gated_text, gated_echo = chat_steered["gated"]
    assert messages(anthropic_client, gated) == (gated_text, gated_echo)
    streamed, echoes = messages(anthropic_client, gated, stream=True)
    assert streamed == gated_text and echoes["message_delta"] == gated_echo
    assert "steered_tokens" not in echoes["message_start"]


BODIES = {"/v1/responses": {"model": MODEL_NAME, "input": TEXT, "max_output_tokens": 2},
          "/v1/messages": {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2}}
BAD = [  # (steering or extra fields, param, code)
    ({"steering": {"features": [{"layer": 7, "index": 3, "mode": "add", "value": 1.0}]}},
     "steering.features[0].layer", "layer_not_loaded"),
    ({"steering": {"features": [{"layer": 1, "index": 3, "mode": "add"}]}}, "steering.features[0].value",
     "missing_value"),
    ({"steering": {"features": [], "vectors": [{"layer": 1, "vector": "AAAA", "mode": "add", "value": 1.0}]}},
     "steering.vectors[0].vector", "vector_not_found"),
    ({"steering": {**STEER, "compare": True}}, "steering.compare", "steering_unsupported_route"),
    ({"steering": STEER, "trace": {"layers": [1]}}, "trace", "steering_unsupported_route"),
]


@pytest.mark.parametrize("route", BODIES)
@pytest.mark.parametrize("extra, param, code", BAD)
def test_bad_steering_is_a_400_with_its_path(http, route, extra, param, code):
    for stream in (False, True):
        response = http.post(route, json={**BODIES[route], **extra, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error


def test_messages_stream_carries_the_echo_in_anthropic_events(http):
    """The raw SSE as an Anthropic client reads it: named events, the echo on message_start's message."""
    with http.stream("POST", "/v1/messages", json={**BODIES["/v1/messages"], "stream": True, "steering": STEER},
                     headers={"anthropic-version": "2023-06-01"}) as response:
        raw = b"".join(response.iter_bytes()).decode()
    events = [dict(line.split(": ", 1) for line in block.split("\n")) for block in raw.strip().split("\n\n")]
    assert [e["event"] for e in events][0] == "message_start" and events[-1]["event"] == "message_stop"
    start = json.loads(events[0]["data"])
    assert start["message"]["steering"]["id"].startswith("steer-") and "steering" not in start


def test_count_tokens_refuses_steering(http):
    """/v1/messages/count_tokens generates nothing: a `steering` there is refused, not ignored."""
    response = http.post("/v1/messages/count_tokens", json={**BODIES["/v1/messages"], "steering": STEER})
    assert response.status_code == 400 and response.json()["error"]["code"] == "steering_unsupported_route"
