"""A hostile client cannot take the shared server down, reach the workers with its own specs,
or get an answer that is not in the OpenAI error shape. Every case here killed the engine,
leaked state or returned a 5xx before the hardening (issue 10); the last test checks the
engine outlived them all."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import API_KEY, MODEL_NAME, PROMPT

STEER = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 6.0}]}
GENERATING_ROUTES = {  # a minimal valid body per route that generates
    "/v1/chat/completions": {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2},
    "/v1/completions": {"model": MODEL_NAME, "prompt": "the weather", "max_tokens": 2},
    "/v1/responses": {"model": MODEL_NAME, "input": "the weather", "max_output_tokens": 2},
    "/v1/messages": {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2},
    "/v1/chat/completions/batch": {"model": MODEL_NAME, "messages": [PROMPT], "max_tokens": 2},
    "/invocations": {"model": MODEL_NAME, "prompt": "the weather", "max_tokens": 2},
}
FORGED = [
    "{}",  # what issue 10 sent: a KeyError inside the worker's step
    "not json",
    '{"id": "x", "layers": [7], "top_k": 99999}',
    "0" * 64 + '.{"features": [], "apply_to": "all"}',  # the signed form, with a made-up signature
]


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code and error["param"] == param, error
    return error


@pytest.mark.parametrize("route", GENERATING_ROUTES)
@pytest.mark.parametrize("key", ["steerserve_steering", "steerserve_capture"])
def test_reserved_vllm_xargs_are_refused_on_every_route(http, route, key):
    for value in FORGED:
        body = {**GENERATING_ROUTES[route], "vllm_xargs": {key: value}}
        assert_error(http.post(route, json=body), 400, "reserved_field", f"vllm_xargs.{key}")


@pytest.mark.parametrize("route", ["/v1/responses", "/v1/messages", "/v1/chat/completions/batch"])
def test_steering_on_a_route_that_cannot_apply_it_is_refused(http, route):
    body = {**GENERATING_ROUTES[route], "steering": STEER}
    error = assert_error(http.post(route, json=body), 400, "steering_unsupported_route", "steering")
    assert route in error["message"]


def test_invocations_steers_like_completions(http):
    body = {**GENERATING_ROUTES["/v1/completions"], "max_tokens": 8, "temperature": 0, "steering": STEER}
    via_invocations = http.post("/invocations", json=body).json()
    via_completions = http.post("/v1/completions", json=body).json()
    plain = http.post("/v1/completions", json={**body, "steering": None}).json()
    assert via_invocations["steering"]["id"] == via_completions["steering"]["id"]
    assert via_invocations["choices"][0]["text"] == via_completions["choices"][0]["text"]
    assert via_invocations["choices"][0]["text"] != plain["choices"][0]["text"]


def test_one_token_prefills_do_not_kill_the_engine(http):
    """vLLM 0.32's CPU conv1d rejected a one-token prefill (sae_plugins/upstream_fixes.py)."""
    assert http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "hi"}).json()["count"] == 1
    one = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert one.status_code == 200 and one.json()["usage"]["completion_tokens"] == 3
    # The shared server prefills in chunks of 128 tokens: 129 tokens leave a one-token last chunk.
    ids = [611] + [5 + i % 50 for i in range(128)]
    chunked = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": ids, "max_tokens": 2})
    assert chunked.status_code == 200 and chunked.json()["usage"]["prompt_tokens"] == 129
    inspected = http.post("/v1/features/inspect", json={"prompt": "hi", "layers": [1], "top_k": 3})
    assert inspected.status_code == 200 and len(inspected.json()["tokens"]) == 1


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/features/inspect",
                                   "/v1/batches", "/v1/responses"])
def test_deeply_nested_json_is_a_400(http, route):
    for depth in (65, 10_000):
        body = ("[" * depth + "]" * depth).encode()
        assert_error(http.post(route, content=body, headers={"content-type": "application/json"}),
                     400, "json_too_deep")
    nested = {"model": MODEL_NAME, "prompt": "x", "metadata": json.loads('{"a":' * 70 + "1" + "}" * 70)}
    assert_error(http.post(route, json=nested), 400, "json_too_deep")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/features/inspect", "/v1/batches"])
def test_malformed_bodies_are_openai_shaped_400s(http, route):
    headers = {"content-type": "application/json"}
    assert_error(http.post(route, content=b"\xff\xfe\x00garbage", headers=headers), 400, "invalid_json")
    assert_error(http.post(route, content=b'{"model": ', headers=headers), 400, "invalid_json")


def test_request_body_size_is_bounded(http):
    big = b'{"prompt": "' + b"a" * (16 * 2**20) + b'"}'
    assert_error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"a" * 2**20
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413, "request_too_large")


def test_steering_values_are_bounded(http):
    body = {**GENERATING_ROUTES["/v1/completions"], "steering": {
        "features": [{"layer": 1, "index": 3, "mode": "add", "value": 1e30}]}}
    error = assert_error(http.post("/v1/completions", json=body), 400, "value_out_of_range",
                         "steering.features[0].value")
    assert "10000" in error["message"]
    body["steering"]["features"][0]["value"] = 1e4  # the bound itself is accepted
    assert http.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("steering", [None, STEER])
def test_cache_salt_and_vllm_xargs_types_checked_alike_steered_or_not(http, steering):
    base = {**GENERATING_ROUTES["/v1/completions"], "steering": steering}
    assert_error(http.post("/v1/completions", json={**base, "cache_salt": 5}), 400, "invalid_type", "cache_salt")
    assert_error(http.post("/v1/completions", json={**base, "vllm_xargs": [1]}), 400, "invalid_type", "vllm_xargs")


def test_unknown_routes_and_methods_are_openai_shaped(http):
    assert_error(http.get("/v1/no-such-route"), 404, "not_found")
    assert_error(http.delete("/v1/saes"), 405, "method_not_allowed")


def test_search_offset_is_bounded(http):
    assert_error(http.get("/v1/features/search", params={"token": " the", "offset": 10**30}), 400,
                 "invalid_request", "offset")


def test_inspect_limits(http):
    started = time.monotonic()
    huge = http.post("/v1/features/inspect", json={"prompt": "weather " * 500_000, "layers": [1]})
    assert_error(huge, 400, "too_many_tokens", "prompt")
    assert time.monotonic() - started < 5  # refused before tokenizing 4 MB
    compare = http.post("/v1/features/inspect", json={"prompt": "the weather", "steering": {**STEER, "compare": True}})
    assert_error(compare, 400, "invalid_steering", "steering.compare")


@pytest.mark.parametrize("path", ["/invocations", "/tokenize", "/detokenize", "/metrics", "/openapi.json", "/version",
                                  "/load", "/v1/models", "/v1/saes", "/v1/files", "/v1/batches",
                                  "/v1/features/search?q=weather", "/v1/features/1/3"])
def test_every_route_needs_the_key(server, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method in ("GET", "POST"):
            response = httpx.request(method, server.base_url + path, headers=headers, json={}, timeout=60)
            assert_error(response, 401, "invalid_api_key")


def test_health_answers_without_the_key(server):
    for path in ("/health", "/ping"):
        assert httpx.get(server.base_url + path, timeout=60).status_code == 200


def test_config_slots_return_to_zero_when_idle(http):
    """The step that reports a burst's last requests finished schedules no tokens; its finished
    ids must still free the workers' slots (they leaked before), aborted streams included."""
    bodies = [{**GENERATING_ROUTES["/v1/completions"], "max_tokens": 6,
               "steering": {"features": [{"layer": 1 + i % 2, "index": 40 + i, "mode": "clamp", "value": 3.0}]}}
              for i in range(6)]
    for body in bodies:
        assert http.post("/v1/completions", json=body).status_code == 200
    with http.stream("POST", "/v1/completions", json={**bodies[0], "stream": True, "max_tokens": 200}) as stream:
        next(stream.iter_bytes())  # leave mid-stream: the server aborts the request
    deadline = time.monotonic() + 60
    while True:
        metrics = http.get("/metrics").text
        in_use = [line for line in metrics.splitlines() if line.startswith("steerserve_config_slots_in_use ")]
        if in_use == ["steerserve_config_slots_in_use 0.0"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert in_use == ["steerserve_config_slots_in_use 0.0"]
    assert "steerserve_active_steering_configs 0.0" in metrics.splitlines()


def test_the_engine_survived_every_hostile_request(server, http):
    """Runs last in this module: everything above went to the same engine."""
    assert server.proc.poll() is None
    response = http.post("/v1/chat/completions", json={**GENERATING_ROUTES["/v1/chat/completions"], "steering": STEER})
    assert response.status_code == 200 and response.json()["steering"]["features"][0]["index"] == 3
    assert "EngineDeadError" not in server.log_tail(10**8)
