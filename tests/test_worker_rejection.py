"""A spec a worker refuses never comes back as a steered answer.

The deployment below is misconfigured the way a Ray node started without the deployment's secret
would be: every vLLM process the API server spawns (engine core, worker) starts with another
STEERSERVE_SPEC_SECRET, set by a `sitecustomize` that only spawned processes run. The workers
then refuse every spec the API signs and run those requests unsteered; the API must learn of it
and answer 500, streamed or not, while unsteered requests keep working.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from steerserve_sae.protocol.signing import SECRET_ENV
from steerserve.serve_process import ServeProcess
from tests.conftest import API_KEY, AUTH, SERVER_START_TIMEOUT, serve_args, server_env

SITECUSTOMIZE = f"""
import os, sys
if "--multiprocessing-fork" in sys.argv:  # a process vLLM spawned, not the API server itself
    os.environ[{SECRET_ENV!r}] = "not-the-deployment-secret"
"""
STEERED = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the weather."}],
           "max_tokens": 4, "temperature": 0,
           "steering": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 6.0}]}}
STEERED_BY_ROUTE = {  # the same steered request on every route that takes `steering` inline
    "/v1/chat/completions": STEERED,
    "/v1/responses": {"model": "tiny", "input": STEERED["messages"], "max_output_tokens": 4, "temperature": 0,
                      "steering": STEERED["steering"]},
    "/v1/messages": STEERED,  # Anthropic's body has the same fields here
}


@pytest.fixture(scope="module")
def misconfigured(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rejecting")
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = server_env() | {"PYTHONPATH": str(root), "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    running = ServeProcess(serve_args(tiny_model_dir, "--enforce-eager", "--api-key", API_KEY,
                                      "--data-dir", str(root / "data")), root / "server.log", env=env)
    try:
        running.wait_ready(SERVER_START_TIMEOUT)
        with httpx.Client(base_url=running.base_url, headers=AUTH, timeout=300) as http:
            yield running, http
    finally:
        running.stop()


def _assert_rejected(response: httpx.Response) -> None:
    assert response.status_code == 500, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "spec_rejected_by_worker", None)
    assert "bad signature" in error["message"] and SECRET_ENV in error["message"]


@pytest.mark.parametrize("route", STEERED_BY_ROUTE)
def test_a_steered_completion_is_a_500_not_an_unsteered_answer(misconfigured, route):
    _, http = misconfigured
    _assert_rejected(http.post(route, json=STEERED_BY_ROUTE[route]))


@pytest.mark.parametrize("route", STEERED_BY_ROUTE)
def test_a_steered_stream_is_a_500_before_any_event(misconfigured, route):
    _, http = misconfigured
    with http.stream("POST", route, json={**STEERED_BY_ROUTE[route], "stream": True}) as response:
        response.read()
        _assert_rejected(response)


def test_a_traced_completion_is_a_500(misconfigured):
    _, http = misconfigured
    body = {"model": "tiny", "prompt": "The weather is", "max_tokens": 4, "temperature": 0,
            "trace": {"layers": [1], "top_k": 2}}
    _assert_rejected(http.post("/v1/completions", json=body))


def test_unsteered_requests_still_work_and_the_misconfiguration_is_logged(misconfigured):
    server, http = misconfigured
    body = {k: v for k, v in STEERED.items() if k != "steering"}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and "steering" not in response.json()
    log = server.log_tail(200_000)
    assert "workers cannot verify the API's signatures (engine 0 rank 0: bad signature)" in log
    assert "failing the request" in log
    assert _rejected_specs(http) >= 3  # the three requests above; the counter is a debounced snapshot


def _rejected_specs(http: httpx.Client) -> float:
    value = 0.0
    for _ in range(20):
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("steerserve_worker_rejected_specs_total"):
                value = json.loads(line.split()[-1])
        if value >= 3:
            break
        time.sleep(0.5)
    return value
