"""A hostile client cannot take the shared server down, reach the workers with its own specs,
or get an answer that is not in the OpenAI error shape. Every case here killed the engine,
leaked state or returned a 5xx before the hardening (issue 10); the last test checks the
engine outlived them all."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import httpx
import pytest

from tests.conftest import API_KEY, AUTH, MODEL_NAME, PROMPT, metric

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


@pytest.mark.parametrize("route", ["/v1/chat/completions/batch"])
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
    """vLLM 0.32's CPU conv1d rejected a one-token prefill (sae_plugins/steerserve_sae/vllm_hooks/upstream_fixes.py)."""
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
                                  "/v1/features/search?q=weather", "/v1/features/1/3", "/v1/chat/completions",
                                  "/v1/features/inspect"])
def test_every_method_of_every_route_needs_the_key(server, path):
    """OPTIONS /metrics answered the whole Prometheus text without a key (issue 21)."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
            response = httpx.request(method, server.base_url + path, headers=headers, json={}, timeout=60)
            if method == "HEAD":  # no body to carry the error
                assert response.status_code == 401 and response.content == b""
            else:
                assert_error(response, 401, "invalid_api_key")
    # A CORS preflight: this server has no --allowed-origins, so vLLM's CORS middleware refuses
    # every origin (only with --allowed-origins does it answer preflights, without a key).
    preflight = httpx.options(server.base_url + path, headers={"Origin": "https://example.com",
                                                              "Access-Control-Request-Method": "POST"}, timeout=60)
    assert (preflight.status_code, preflight.text) == (400, "Disallowed CORS origin")


def test_several_content_types_are_refused(server, http):
    """With `application/json` and then a multipart type, the guard used to read the last one and
    skip the body while vLLM read the first and parsed it: steering silently ignored, 20 MiB
    accepted, a client's reserved vllm_xargs reaching the workers (issue 21)."""
    forged = {**GENERATING_ROUTES["/v1/completions"], "steering": STEER,
              "vllm_xargs": {"steerserve_steering": FORGED[0]}}
    rejected = metric(server, "steerserve_worker_rejected_specs_total")
    for types in (["application/json", "multipart/form-data; boundary=x"],
                  ["multipart/form-data; boundary=x", "application/json"], ["application/json", "application/json"]):
        headers = [*AUTH.items(), *(("content-type", t) for t in types)]
        for body in (json.dumps(forged).encode(), b'{"prompt": "' + b"a" * (20 * 2**20) + b'"}'):
            response = httpx.post(server.base_url + "/v1/completions", content=body, headers=headers, timeout=120)
            error = assert_error(response, 400, "ambiguous_content_type")
            assert "2 Content-Type headers" in error["message"]
    assert metric(server, "steerserve_worker_rejected_specs_total") == rejected


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "text/plain", "application/jsonl",
                                          "application/x-www-form-urlencoded", None])
def test_a_json_route_takes_only_json(http, content_type):
    """A multipart Content-Type on inspect skipped the guard, and 100,000 levels of JSON then
    exhausted the handler's parser: a 500 (issue 21)."""
    headers = {"content-type": content_type} if content_type else {}
    if content_type is None:  # httpx would not add one, but say so
        assert "content-type" not in http.build_request("POST", "/v1/completions", content=b"{}").headers
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    steered = json.dumps({**GENERATING_ROUTES["/v1/completions"], "steering": STEER}).encode()
    for path, body in (("/v1/features/inspect", deep), ("/v1/completions", steered), ("/v1/batches", b"{}")):
        error = assert_error(http.post(path, content=body, headers=headers), 415, "unsupported_media_type")
        assert path in error["message"] and "application/json" in error["message"]
    declared = {"content-type": "Application/JSON; charset=utf-8"}  # the media type is what counts
    assert_error(http.post("/v1/features/inspect", content=deep, headers=declared), 400, "json_too_deep")
    assert http.post("/v1/completions", content=steered, headers=declared).json()["steering"]["features"]
    assert http.post("/v1/batches/batch_none/cancel").status_code == 404  # no body: no content type needed
    upload = http.post("/v1/files", files={"file": ("in.jsonl", b'{"custom_id": "a"}\n')}, data={"purpose": "batch"})
    assert upload.status_code == 200 and upload.json()["bytes"] == 19  # multipart uploads are untouched


@pytest.mark.parametrize("route", GENERATING_ROUTES)
def test_clients_cannot_jump_the_queue(http, route):
    """The server schedules by priority (batch lines run at 1); a client sending -1000000 went
    ahead of everyone (issue 21). --client-priority-range defaults to 0: (0 or more)."""
    for priority in (-1, -1_000_000, -(2**63), "-5", -1.0):
        error = assert_error(http.post(route, json={**GENERATING_ROUTES[route], "priority": priority}), 400,
                             "priority_out_of_range", "priority")
        assert "0 or more" in error["message"] and "--client-priority-range" in error["message"]
    if route == "/v1/completions":
        for priority in (0, 3):
            assert http.post(route, json={**GENERATING_ROUTES[route], "priority": priority}).status_code == 200


def test_a_client_that_writes_the_whole_body_first_reads_the_refusal(server):
    """The 413 went out from Content-Length and the connection closed under the client still
    writing (urllib sends `Connection: close`): a reset instead of the answer (issue 21)."""
    def chunked():  # no Content-Length: refused once 16 MiB have arrived, the rest is drained
        for _ in range(20):
            yield b"a" * 2**20

    for data, auth, status, code in ((b"a" * (20 * 2**20), AUTH, 413, "request_too_large"),
                                     (chunked(), AUTH, 413, "request_too_large"),
                                     (b"a" * (20 * 2**20), {}, 401, "invalid_api_key")):
        request = urllib.request.Request(server.base_url + "/v1/completions", data=data,
                                         headers={"Content-Type": "application/json", **auth})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=120)
        assert refused.value.code == status
        assert json.loads(refused.value.read())["error"]["code"] == code


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/features/inspect", "/tokenize"])
def test_a_lone_surrogate_in_a_prompt_is_not_a_server_error(http, route):
    """JSON may escape a lone surrogate ("\\ud800"); Python's parser keeps it, no tokenizer can
    encode it. A batch line carrying one goes through the same routes."""
    prompt = {"messages": [{"role": "user", "content": "the \ud800 weather"}]} if "chat" in route else {
        "prompt": "the \ud800 weather"}
    text = json.dumps({"model": MODEL_NAME, "max_tokens": 2, **prompt})  # ASCII: the surrogate as an escape
    response = http.post(route, content=text.encode(), headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


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
