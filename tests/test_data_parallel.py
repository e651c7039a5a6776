"""Data parallelism 2: traces, gate reports and inspect captures reach the engine that ran the
request.

vLLM's DP client sends a collective RPC to every engine but returns engine 0's reply only, and a
take deletes what it reads; before server/steerserve/engine_rpc.py, half of concurrent traced requests
came back without their trace. vLLM's CPU build runs DP=2 on two cores. vLLM's own per-engine
request counters show that both engines served requests, so the test really crossed engines.
"""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import API_KEY, AUTH, ServeProcess, own_engine_runners, runner_env, serve_args, serving

REQUESTS = 8
GATED = {"features": [{"layer": 2, "index": 9, "mode": "add", "value": 4.0,
                       "when": {"layer": 1, "index": 3, "above": -1.0}}]}  # passes on every token
TRACE = {"layers": [1, 2], "top_k": 3, "positions": "generation"}
MAX_TOKENS = 6


@pytest.fixture(scope="module", params=own_engine_runners())
def dp_server(request, tiny_model_dir, tmp_path_factory) -> ServeProcess:
    log = tmp_path_factory.mktemp(f"dp-{request.param}") / "server.log"
    args = serve_args(tiny_model_dir, "--data-parallel-size", "2", "--enforce-eager", "--api-key", API_KEY,
                      "--data-dir", str(log.parent / "data"))
    with serving(args, log, runner_env(request.param)) as running:
        yield running


def _chat(base_url: str, i: int, stream: bool) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"Tell me about the weather, number {i}."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "steering": GATED, "trace": TRACE, "stream": stream}
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=300) as http:
        if not stream:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            data = response.json()
            return {"trace": data["choices"][0]["trace"], "steering": data["steering"]}
        trace, steering = [], {}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = httpx.Response(200, content=line[6:]).json()
                for choice in chunk.get("choices", []):
                    trace += choice.get("trace", [])
                if "steered_tokens" in chunk["steering"]:  # the last chunk's echo has the gate report
                    steering = chunk["steering"]
        return {"trace": trace, "steering": steering}


def _inspect(base_url: str, i: int) -> dict:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=300) as http:
        response = http.post("/v1/features/inspect", json={"model": "tiny", "prompt": f"The cat number {i} sat.",
                                                           "layers": [1], "top_k": 2})
        assert response.status_code == 200, response.text
        return response.json()


def _requests_per_engine(server: ServeProcess) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", headers=AUTH).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'vllm:request_success_total\{(.*)\} ([0-9.e+]+)$', line)
        engine = re.search(r'engine="(\d+)"', m.group(1)) if m else None
        if engine:
            counts[engine.group(1)] = counts.get(engine.group(1), 0) + float(m.group(2))
    return counts


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_concurrent_request_gets_its_trace_and_gate_report(dp_server, stream):
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(lambda i: _chat(dp_server.base_url, i, stream), range(REQUESTS)))
    for result in results:
        # one trace entry per generated token, each with both layers; the gate let every steered
        # token through (the prompt's, and each generated one that was fed back)
        assert [sorted(e["features"]) for e in result["trace"]] == [["1", "2"]] * MAX_TOKENS
        steering = result["steering"]
        assert steering["steered_tokens"] > MAX_TOKENS
        assert steering["features"][0]["edited_tokens"] == steering["steered_tokens"]


def test_every_concurrent_inspect_gets_its_capture(dp_server):
    with ThreadPoolExecutor(REQUESTS) as pool:
        reports = list(pool.map(lambda i: _inspect(dp_server.base_url, i), range(REQUESTS)))
    for report in reports:
        assert report["tokens"] and all(len(t["features"]["1"]) == 2 for t in report["tokens"])


def _dashboards(base_url: str, texts: list[str], first_id: int = 0) -> dict:
    body = {"layers": [1], "top_n": 3, "documents": [{"id": first_id + i, "prompt": t} for i, t in enumerate(texts)]}
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=300) as http:
        response = http.post("/v1/features/dashboards", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _fired_total(reply: dict) -> int:
    return int(np.frombuffer(base64.b64decode(reply["layers"]["1"]["fired"]), dtype="<i8").sum())


def test_dashboard_batch_counts_the_documents_of_both_engines(dp_server):
    """A batch's documents run on both engines; the reply merges both engines' parts: every
    document's tokens are counted, and the firings equal those of the documents run one batch
    each (each such batch runs on one engine, whole)."""
    texts = [f"Document number {i} talks about the weather and the sea." * (1 + i % 3) for i in range(REQUESTS)]
    before = _requests_per_engine(dp_server)
    batch = _dashboards(dp_server.base_url, texts)
    after = _requests_per_engine(dp_server)
    assert all(after[e] > before.get(e, 0) for e in ("0", "1")), (before, after)  # both engines ran documents
    assert batch["layers"]["1"]["tokens"] == sum(len(tokens) for tokens in batch["documents"].values())
    singles = [_dashboards(dp_server.base_url, [t], first_id=i) for i, t in enumerate(texts)]
    assert batch["layers"]["1"]["tokens"] == sum(s["layers"]["1"]["tokens"] for s in singles)
    assert _fired_total(batch) == pytest.approx(sum(_fired_total(s) for s in singles), rel=0.01)


def test_both_engines_served_requests(dp_server):
    per_engine = _requests_per_engine(dp_server)
    assert set(per_engine) == {"0", "1"} and min(per_engine.values()) > 0, per_engine
