"""Steering presets served as models, on the shared server (conftest.py): the official `openai`
client steers by naming a preset as its model (no extra_body) and gets the same tokens as the
same spec inline; /v1/models lists presets in vLLM's LoRA-adapter shape; the CRUD routes with
their 400/404/409s and the API key; inline steering added to a preset's; every generating route
(completions, /invocations, /v1/responses, /v1/messages, batch lines) resolves a preset.
Restart and --steering-presets are in test_preset_restart.py (servers of their own)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import MODEL_NAME, PROMPT
from tests.test_batch_api import lines_of, request_line, submit, wait

MAX_TOKENS = 8
STEER = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}
EXTRA = {"layer": 2, "index": 9, "mode": "clamp", "value": 20.0}
PRESET = "test-german"


@pytest.fixture(scope="module")
def preset(http):
    created = http.post("/v1/steering/presets", json={"name": PRESET, "steering": STEER, "description": "weather"})
    assert created.status_code == 200, created.text
    yield created.json()
    http.delete(f"/v1/steering/presets/{PRESET}")


def inline_chat(http, steering, **extra):
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "steering": steering,
            **extra}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_openai_client_steers_through_a_preset_without_extra_body(client, http, preset):
    assert preset == {"object": "steering.preset", "name": PRESET, "steering": STEER, "description": "weather",
                      "created_at": preset["created_at"], "source": "api", "status": "served", "refused_because": None}
    steered = client.chat.completions.create(model=PRESET, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    inline = inline_chat(http, STEER)
    unsteered = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=MAX_TOKENS,
                                               temperature=0)
    assert steered.choices[0].message.content == inline["choices"][0]["message"]["content"]
    assert steered.choices[0].message.content != unsteered.choices[0].message.content
    assert steered.model == PRESET
    assert steered.model_extra["steering"] == {**inline["steering"], "preset": PRESET}


def test_models_lists_each_preset_in_the_lora_adapter_shape(client, http, preset):
    assert [m.id for m in client.models.list().data][:1] == [MODEL_NAME]  # vLLM's own entries first
    card = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == PRESET)
    assert card == {"id": PRESET, "object": "model", "created": preset["created_at"],
                                 "owned_by": "steerserve", "root": MODEL_NAME, "parent": MODEL_NAME,
                                 "max_model_len": 1024, "permission": [], "description": "weather"}


def test_every_sse_chunk_names_the_preset(http, preset):
    body = {"model": PRESET, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert events[-1] == "[DONE]" and len(chunks) > 2
    assert {c["model"] for c in chunks} == {PRESET}
    assert all(c["steering"]["preset"] == PRESET for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == inline_chat(http, STEER)["choices"][0]["message"]["content"]


def test_inline_steering_is_added_to_the_presets(http, preset):
    merged = http.post("/v1/chat/completions", json={"model": PRESET, "messages": PROMPT, "max_tokens": MAX_TOKENS,
                                                      "temperature": 0, "steering": {"features": [EXTRA]}}).json()
    both = inline_chat(http, {"features": [EXTRA, *STEER["features"]]})
    assert merged["choices"][0]["message"]["content"] == both["choices"][0]["message"]["content"]
    assert merged["steering"] == {**both["steering"], "preset": PRESET}
    conflict = http.post("/v1/chat/completions", json={
        "model": PRESET, "messages": PROMPT, "steering": {"features": [{**STEER["features"][0], "value": 2.0}]}})
    assert conflict.status_code == 400
    assert conflict.json()["error"] == {
        "message": f"feature 3 at layer 1 is already steered by preset '{PRESET}'", "type": "invalid_request_error",
        "param": "steering.features[0]", "code": "preset_conflict"}


def test_completions_invocations_and_compare_resolve_a_preset(http, preset):
    def complete(path, model, **extra):
        response = http.post(path, json={"model": model, "prompt": "The weather today is", "max_tokens": MAX_TOKENS,
                                         "temperature": 0, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    inline = complete("/v1/completions", MODEL_NAME, steering=STEER)
    plain = complete("/v1/completions", MODEL_NAME)
    for path in ("/v1/completions", "/invocations"):
        steered = complete(path, PRESET)
        assert steered["choices"][0]["text"] == inline["choices"][0]["text"]
        assert (steered["model"], steered["steering"]["preset"]) == (PRESET, PRESET)
    compared = complete("/v1/completions", PRESET, steering={"compare": True})
    assert compared["choices"][0]["text"] == inline["choices"][0]["text"]
    assert compared["baseline"]["choices"][0]["text"] == plain["choices"][0]["text"]


def test_responses_and_messages_resolve_a_preset(client, preset, http):
    text = inline_chat(http, STEER)["choices"][0]["message"]["content"]
    response = client.responses.create(model=PRESET, input=PROMPT, max_output_tokens=MAX_TOKENS, temperature=0)
    assert (response.output_text, response.model, response.model_extra["steering"]["preset"]) == (text, PRESET, PRESET)
    streamed = [event.response for event in client.responses.create(
        model=PRESET, input=PROMPT, max_output_tokens=MAX_TOKENS, temperature=0, stream=True) if hasattr(event, "response")]
    assert streamed and {(r.model, r.model_extra["steering"]["preset"]) for r in streamed} == {(PRESET, PRESET)}
    assert streamed[-1].output_text == text
    message = http.post("/v1/messages", json={"model": PRESET, "messages": PROMPT, "max_tokens": MAX_TOKENS,
                                              "temperature": 0}).json()
    assert (message["content"][0]["text"], message["model"], message["steering"]["preset"]) == (text, PRESET, PRESET), message


def test_a_batch_line_resolves_a_preset(client, http, preset):
    body = {"model": PRESET, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    batch = wait(client, submit(client, [request_line("p1", body)]).id)
    (out,) = lines_of(client, batch.output_file_id)
    answer = out["response"]["body"]
    assert out["response"]["status_code"] == 200, out
    assert answer["choices"][0]["message"]["content"] == inline_chat(http, STEER)["choices"][0]["message"]["content"]
    assert (answer["model"], answer["steering"]["preset"]) == (PRESET, PRESET)


def test_crud_and_its_errors(http, preset):
    listed = http.get("/v1/steering/presets").json()
    assert listed["object"] == "list" and preset in listed["data"]
    assert http.get(f"/v1/steering/presets/{PRESET}").json() == preset
    cases = [
        ({"name": PRESET, "steering": STEER}, 409, "name", "preset_exists"),
        ({"name": MODEL_NAME, "steering": STEER}, 409, "name", "model_name_taken"),
        ({"name": "no spaces", "steering": STEER}, 400, "name", "invalid_preset_name"),
        ({"name": "x" * 65, "steering": STEER}, 400, "name", "invalid_preset_name"),
        ({"name": "p2", "steering": {"features": [{"layer": 1, "index": 99999, "mode": "add", "value": 1}]}}, 400,
         "steering.features[0].index", "index_out_of_range"),
        ({"name": "p2", "steering": {**STEER, "compare": True}}, 400, "steering.compare", "invalid_steering"),
        ({"name": "p2", "steering": {"features": []}}, 400, "steering.features", "invalid_steering"),
        ({"name": "p2", "steering": STEER, "colour": "red"}, 400, "colour", "invalid_request"),
        ({"steering": STEER}, 400, "name", "invalid_request"),
        ({"name": "p2", "steering": STEER, "description": "x" * 1001}, 400, "description", "description_too_long"),
        ({"name": "p2", "steering": {"features": [STEER["features"][0]] * 1500}}, 400, "steering", "preset_too_large"),
    ]
    for body, status, param, code in cases:
        response = http.post("/v1/steering/presets", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (body, error)
    for method in ("GET", "DELETE"):
        missing = http.request(method, "/v1/steering/presets/nope")
        assert missing.status_code == 404
        assert missing.json()["error"] == {"message": "no steering preset named 'nope'", "type": "invalid_request_error",
                                           "param": "name", "code": "preset_not_found"}


def test_a_deleted_preset_is_an_unknown_model(http):
    assert http.post("/v1/steering/presets", json={"name": "short-lived", "steering": STEER}).status_code == 200
    deleted = http.delete("/v1/steering/presets/short-lived")
    assert deleted.json() == {"object": "steering.preset.deleted", "name": "short-lived", "deleted": True}
    gone = http.post("/v1/chat/completions", json={"model": "short-lived", "messages": PROMPT, "max_tokens": 2})
    never = http.post("/v1/chat/completions", json={"model": "never-was", "messages": PROMPT, "max_tokens": 2})
    assert gone.status_code == never.status_code == 404
    assert gone.json()["error"]["message"].replace("short-lived", "X") == never.json()["error"]["message"].replace(
        "never-was", "X")
    assert gone.json()["error"]["code"] == never.json()["error"]["code"]
    assert "short-lived" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_the_preset_routes_need_the_key(server):
    for method, path in [("GET", "/v1/steering/presets"), ("POST", "/v1/steering/presets"),
                         ("GET", "/v1/steering/presets/x"), ("DELETE", "/v1/steering/presets/x")]:
        response = httpx.request(method, server.base_url + path, json={"name": "x", "steering": STEER})
        assert response.status_code == 401, (method, path)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_preset_is_bounded_in_size_so_the_model_list_stays_small(http):
    """A 15 MiB description (the body limit is 16 MiB) is refused, and /v1/models stays the size it was."""
    before = len(http.get("/v1/models").content)
    huge = http.post("/v1/steering/presets", json={"name": "huge", "steering": STEER, "description": "x" * (15 << 20)})
    assert huge.status_code == 400
    assert huge.json()["error"] == {
        "message": "description is 15728640 characters; this server takes at most 1000 "
                   "(--max-preset-description-chars)",
        "type": "invalid_request_error", "param": "description", "code": "description_too_long"}
    wide = http.post("/v1/steering/presets", json={"name": "wide", "steering": {"features": [EXTRA] * 1500}})
    assert wide.json()["error"]["message"] == (
        "the steering spec is 75014 bytes as JSON; a preset's takes at most 65536 (--max-preset-spec-bytes): name "
        "stored vectors (/v1/steering/vectors) rather than inline them")
    assert len(http.get("/v1/models").content) == before


@pytest.mark.parametrize("path, body, field", [
    ("/v1/messages/count_tokens", {"messages": PROMPT}, "input_tokens"),
    ("/tokenize", {"messages": PROMPT}, "count"),
])
def test_a_preset_counts_tokens_as_the_served_model(http, preset, path, body, field):
    as_preset = http.post(path, json={"model": PRESET, **body})
    as_model = http.post(path, json={"model": MODEL_NAME, **body})
    assert as_preset.status_code == as_model.status_code == 200, as_preset.text
    assert as_preset.json()[field] == as_model.json()[field] > 5
