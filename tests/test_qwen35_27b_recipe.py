"""The 27B recipe, rehearsed: `steerserve serve --config configs/qwen3.5-27b.yaml` on offline
stand-ins of `Qwen/Qwen3.5-27B` and `Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50`, with vLLM's qwen3
reasoning parser and qwen3_coder tool parser, steering, traces, gates and compare.

The config is served as written (hub ids for the model and the SAEs, the recipe's parsers,
language-model-only) with CPU overrides only: one tensor-parallel rank and a small memory
reservation (REFERENCE.md section 4), plus the test's own --data-dir; the host and port come from
ServeProcess. HF_HUB_OFFLINE=1 and HF_HUB_CACHE point at a cache the stand-ins are written into
(tests/qwen35_27b_standin.py: the real config.json and chat-template shape, the release's SAE file
set, a hand-built circuit whose greedy answer is a scripted think block and a tool call). One
engine start for the module.

Public sources of the shapes: vllm-project/recipes `Qwen/Qwen3.5.md` (the parsers and flags);
the Qwen/Qwen3.5-27B config.json as reproduced in public code (the Qwen3.6-27B one has the same
keys); Qwen3.5's chat_template.jinja (mlx-community/Qwen3.5-35B-A3B-4bit's copy, and an ollama
issue rendering the official Qwen/Qwen3.5-27B template); huggingface_hub's file_download.py for
the cache layout.

What only a GPU can tell: the 27B's numerics, memory and speed, tensor parallelism over 4 GPUs,
and CUDA graphs around the steering op.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import ROOT, serving
from tests.qwen35_27b_standin import (
    REASONING, SAE_K, SAE_LAYERS, SAE_REPO, STEERED_CITY, D_SAE, WEATHER_TOOL, build_standins,
)

MODEL = "qwen3.5-27b"  # served-model-name in the config
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
FREE_VALUE = 24.0  # clamp of a free axis: changes nothing the model reads out
CITY_VALUE = 12.0  # clamp of the city feature: above a token's 6.0, so Berlin beats Paris


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    work = tmp_path_factory.mktemp("qwen35-27b")
    standin = build_standins(work / "hub")
    args = ["--config", str(ROOT / "configs" / "qwen3.5-27b.yaml"), "--tensor-parallel-size", "1",
            "--gpu-memory-utilization", "0.05", "--data-dir", str(work / "data")]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hub")}
    with serving(args, work / "server.log", env) as running:
        with httpx.Client(base_url=running.base_url, timeout=300) as http:
            yield http, standin


def chat(http: httpx.Client, **extra) -> dict:
    body = {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER_TOOL], "temperature": 0, "max_tokens": 40, **extra}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(http: httpx.Client, **extra) -> list[dict]:
    body = {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER_TOOL], "temperature": 0, "max_tokens": 40,
            "stream": True, **extra}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def tokenize(http: httpx.Client, messages: list[dict], **extra) -> list[int]:
    """The prompt vLLM renders for `messages` (its /tokenize: the chat completions' renderer)."""
    response = http.post("/tokenize", json={"model": MODEL, "messages": messages, **extra})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def prompt_ids(http: httpx.Client) -> list[int]:
    return tokenize(http, MESSAGES, tools=[WEATHER_TOOL])


def steering(standin) -> dict:
    """Two gated clamps: a free axis at layer 16 on the reasoning tokens (the answer stays as
    scripted), and the city feature at layer 32 where the city is due (the call says Berlin)."""
    at16, at32 = standin.features[16], standin.features[32]
    return {"features": [
        {"layer": 16, "index": at16.free[0], "mode": "clamp", "value": FREE_VALUE,
         "when": {"layer": 16, "index": at16.reasoning, "above": 2.0}},
        {"layer": 32, "index": at32.city, "mode": "clamp", "value": CITY_VALUE,
         "when": {"layer": 32, "index": at32.token[standin.city_cue], "above": 3.0}},
    ]}


def expected_trace_features(standin, token: int, layer: int, steered: bool) -> dict[int, float]:
    """Features above 1 at a position that reads `token`, as the circuit builds them: its token
    feature; on reasoning tokens the reasoning feature and (steered) the free axis clamped at
    layer 16, which no later layer touches; where the city is due (steered, from layer 32 on) the
    city feature."""
    at = standin.features[layer]
    expected = {at.token[token]: 6.0}
    if token in standin.reasoning_ids:
        expected[at.reasoning] = 4.0
        if steered:
            expected[at.free[0]] = FREE_VALUE
    if steered and token == standin.city_cue and layer >= 32:
        expected[at.city] = CITY_VALUE
    return expected


def check_trace(trace: list[dict], standin, first_position: int, steered: bool) -> None:
    """One entry per generated token; entry i reads the token before generated token i (the
    steered answer writes Berlin where the script has Paris)."""
    read = [standin.prompt_end, *standin.script_ids[:-1]]
    if steered:
        read[read.index(standin.city_cue) + 1] = standin.berlin
    assert [e["position"] for e in trace] == list(range(first_position, first_position + len(read)))
    for entry, token in zip(trace, read):
        for layer in (16, 32):
            fired = {f["index"]: f["activation"] for f in entry["features"][str(layer)] if f["activation"] > 1.0}
            expected = expected_trace_features(standin, token, layer, steered)
            assert fired == pytest.approx(expected, rel=0.02), (entry["position"], layer)


def tool_call(message: dict) -> tuple[str, dict]:
    [call] = message["tool_calls"]
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_served_from_the_hub_cache_with_the_release_saes(recipe):
    http, standin = recipe
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL]
    saes = http.get("/v1/saes").json()["data"]
    commit = (standin.cache / f"models--{SAE_REPO.replace('/', '--')}" / "refs" / "main").read_text()
    assert [(s["layer"], s["d_sae"], s["k"], s["architecture"], s["source"]) for s in saes] == [
        (n, D_SAE, SAE_K, "qwen-scope/topk", f"hf://{SAE_REPO}@{commit}/layer{n}.sae.pt") for n in SAE_LAYERS]
    assert all(s["d_model"] == 128 for s in saes)


def test_reasoning_and_tool_call_are_parsed(recipe):
    """vLLM 0.32 puts the think block in `reasoning` (its ChatMessage has no `reasoning_content`)
    and the qwen3_coder parser turns the XML call into tool_calls with JSON arguments."""
    http, standin = recipe
    response = chat(http)
    choice = response["choices"][0]
    message = choice["message"]
    assert message["reasoning"] == REASONING
    assert "reasoning_content" not in message
    assert message["content"] is None
    assert tool_call(message) == ("get_weather", {"city": "Paris"})
    assert choice["finish_reason"] == "tool_calls"
    assert response["usage"]["completion_tokens"] == len(standin.script_ids)
    assert response["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(standin.reasoning_ids)
    assert "steering" not in response


def test_thinking_off_goes_straight_to_the_call(recipe):
    """With enable_thinking false the template closes the think block in the prompt; the parser
    then reads everything as content and finds the call."""
    http, _ = recipe
    message = chat(http, chat_template_kwargs={"enable_thinking": False})["choices"][0]["message"]
    assert message.get("reasoning") is None
    assert tool_call(message) == ("get_weather", {"city": "Paris"})


def test_steered_call_with_trace_gates_and_compare(recipe):
    """The free-axis clamp applies exactly on the reasoning tokens (the trace shows it there at
    its value, nowhere else), the city clamp where the city is due: the parsed call says Berlin,
    the reasoning is untouched, and compare's baseline (same request unsteered) says Paris."""
    http, standin = recipe
    spec = steering(standin)
    response = chat(http, steering={**spec, "compare": True}, trace={"layers": [16, 32], "top_k": 3})
    choice, baseline = response["choices"][0], response["baseline"]["choices"][0]
    assert choice["message"]["reasoning"] == baseline["message"]["reasoning"] == REASONING
    assert tool_call(choice["message"]) == ("get_weather", {"city": STEERED_CITY})
    assert tool_call(baseline["message"]) == ("get_weather", {"city": "Paris"})
    assert choice["finish_reason"] == baseline["finish_reason"] == "tool_calls"

    prompt = prompt_ids(http)
    assert len(prompt) == response["usage"]["prompt_tokens"]
    echo = response["steering"]
    assert re.fullmatch(r"steer-[0-9a-f]{16}", echo["id"])
    reasoning_reads = sum(t in standin.reasoning_ids for t in prompt) + len(standin.reasoning_ids)
    city_reads = prompt.count(standin.city_cue) + 1
    assert [f.pop("edited_tokens") for f in echo["features"]] == [reasoning_reads, city_reads]
    assert echo == {"id": echo["id"], "features": spec["features"], "apply_to": "all",
                    "steered_tokens": len(prompt) + response["usage"]["completion_tokens"] - 1}
    assert "steering" not in response["baseline"]

    first = len(prompt) - 1
    check_trace(choice["trace"], standin, first, steered=True)
    check_trace(baseline["trace"], standin, first, steered=False)


def test_a_tool_conversation_is_counted_and_inspected_as_vllm_renders_it(recipe):
    """The next turn of a tool conversation, as OpenAI clients send it: the call's arguments a
    JSON string, the thinking under `reasoning`. vLLM hands the template the arguments as a
    mapping (Qwen3.5's template iterates them: a string makes it raise) and the thinking as
    reasoning_content. Residual traces of all positions count the prompt and inspect tokenizes
    it the same way, so both serve it, over exactly the prompt the completion ran."""
    http, standin = recipe
    turn = {"role": "assistant", "content": None, "reasoning": REASONING, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    messages = [*MESSAGES, turn, {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"}]
    prompt = tokenize(http, messages, tools=[WEATHER_TOOL])
    assert _contains(prompt, standin.reasoning_ids)  # the earlier turn's thinking is in the prompt
    answer = chat(http, messages=messages, trace={"layers": [16], "top_k": 1, "positions": "all", "residuals": True})
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    trace = answer["choices"][0]["trace"]
    assert [e["position"] for e in trace] == list(range(len(prompt) + answer["usage"]["completion_tokens"] - 1))
    assert all(set(e["residuals"]) == {"16"} for e in trace)
    assert tool_call(answer["choices"][0]["message"]) == ("get_weather", {"city": "Paris"})
    response = http.post("/v1/features/inspect", json={"messages": messages, "layers": [16], "top_k": 1})
    assert response.status_code == 200, response.text
    assert [t["token_id"] for t in response.json()["tokens"]] == tokenize(http, messages)


def _contains(tokens: list[int], run: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i : i + len(run)]) == run for i in range(len(tokens)))


def test_steered_stream_parses_and_echoes_in_every_chunk(recipe):
    """Streamed, the same spec: reasoning and tool-call deltas add up to the JSON answer, every
    chunk carries the echo, the last one the gate report, and the trace pieces add up."""
    http, standin = recipe
    spec = steering(standin)
    # its own cache namespace: the counts below include the prompt, which must be computed again
    chunks = stream(http, steering=spec, trace={"layers": [16, 32], "top_k": 3}, cache_salt="streamed")
    *deltas, last = chunks
    ids = {c["steering"]["id"] for c in chunks}
    assert len(ids) == 1 and all(c["steering"]["features"][0]["index"] == spec["features"][0]["index"] for c in chunks)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning") or "" for c in deltas)
    assert reasoning == REASONING
    calls = [t for c in deltas for t in c["choices"][0]["delta"].get("tool_calls") or []]
    assert {t["function"].get("name") for t in calls} - {None} == {"get_weather"}
    assert json.loads("".join(t["function"].get("arguments") or "" for t in calls)) == {"city": STEERED_CITY}
    assert [c["choices"][0]["finish_reason"] for c in deltas if c["choices"][0]["finish_reason"]] == ["tool_calls"]
    prompt = prompt_ids(http)
    reasoning_reads = sum(t in standin.reasoning_ids for t in prompt) + len(standin.reasoning_ids)
    assert [f["edited_tokens"] for f in last["steering"]["features"]] == [reasoning_reads,
                                                                           prompt.count(standin.city_cue) + 1]
    trace = [e for c in chunks for choice in c["choices"] for e in choice.get("trace", [])]
    check_trace(trace, standin, len(prompt) - 1, steered=True)
