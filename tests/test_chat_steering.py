"""Steered chat/completions over real HTTP with the official openai client (one shared server)."""

from __future__ import annotations

import json
import time

from tests.conftest import MODEL_NAME, PROMPT, run_together

MAX_TOKENS = 16


def chat(client, steering=None, messages=PROMPT, **kwargs):
    extra = {"return_token_ids": True}
    if steering is not None:
        extra["steering"] = steering
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, extra_body=extra, **kwargs)


def token_ids(response, choice=0) -> list[int]:
    return list(response.choices[choice].model_extra["token_ids"])


def add(layer, index, value, **more):
    return {"features": [{"layer": layer, "index": index, "mode": "add", "value": value}], **more}


def test_saes_endpoint_lists_loaded_layers(http, tiny_model_dir):
    data = http.get("/v1/saes").json()["data"]
    assert [d["layer"] for d in data] == [1, 2]
    for d in data:
        assert d["d_model"] == 128 and d["d_sae"] == 1024 and d["k"] == 16
        assert d["architecture"] == "qwen-scope/topk"
        assert d["hook_point"] == "resid_post"
        assert d["dtype"] == "bfloat16"
        assert d["source"] == f"layer{d['layer']}.sae.pt"  # relative: no server paths leak


def test_unsteered_chat_has_no_steering_echo(client):
    response = chat(client)
    assert "steering" not in response.model_extra
    assert len(token_ids(response)) == MAX_TOKENS


def test_steering_changes_output_and_is_echoed(client):
    plain = chat(client)
    steered = chat(client, add(1, 3, 8.0))
    assert token_ids(steered) != token_ids(plain)
    echo = steered.model_extra["steering"]
    assert echo["features"] == [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]
    assert echo["apply_to"] == "all"
    assert echo["id"].startswith("steer-") and len(echo["id"]) == 22


def test_same_steering_twice_is_identical_and_id_is_order_independent(client):
    a = chat(client, {"features": [
        {"layer": 1, "index": 3, "mode": "add", "value": 8}, {"layer": 2, "index": 9, "mode": "add", "value": -4}]})
    b = chat(client, {"features": [
        {"layer": 2, "index": 9, "mode": "add", "value": -4.0}, {"layer": 1, "index": 3, "mode": "add", "value": 8}]})
    assert token_ids(a) == token_ids(b)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.model_extra["steering"] == b.model_extra["steering"]


def test_streaming_equals_non_streaming(client):
    steering = add(2, 11, 6.0)
    whole = chat(client, steering)
    stream = chat(client, steering, stream=True)
    text, ids, echoes = "", [], []
    for chunk in stream:
        echoes.append(chunk.model_extra.get("steering"))
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids") or []
    assert text == whole.choices[0].message.content
    assert ids == token_ids(whole)
    assert echoes and all(e == whole.model_extra["steering"] for e in echoes)


def test_n2_both_choices_steered(client):
    """vLLM only allows n > 1 when sampling: same seed twice gives the same two choices, and
    both differ from the unsteered choices under that seed."""
    sampling = dict(n=2, temperature=0.7, seed=1234)
    steering = add(1, 3, 8.0)
    first = chat(client, steering, **sampling)
    again = chat(client, steering, **sampling)
    plain = chat(client, **sampling)
    assert len(first.choices) == 2
    assert [token_ids(first, i) for i in (0, 1)] == [token_ids(again, i) for i in (0, 1)]
    for i in (0, 1):
        assert token_ids(first, i) != token_ids(plain, i)


def test_every_mode_changes_output(client, active_features):
    plain = token_ids(chat(client))
    f1 = active_features[1][0]
    specs = {
        "add": {"layer": 1, "index": f1, "mode": "add", "value": 8.0},
        "clamp": {"layer": 1, "index": f1, "mode": "clamp", "value": 40.0},
        "scale": {"layer": 1, "index": f1, "mode": "scale", "value": 8.0},
        "ablate": {"layer": 1, "index": f1, "mode": "ablate"},
    }
    plain_logprobs = [t.logprob for t in chat(client, logprobs=True).choices[0].logprobs.content]
    outputs, logprobs = {}, {}
    for mode, feature in specs.items():
        response = chat(client, {"features": [feature]}, logprobs=True)
        assert response.model_extra["steering"]["features"][0]["mode"] == mode
        outputs[mode] = token_ids(response)
        logprobs[mode] = [t.logprob for t in response.choices[0].logprobs.content]
    for mode in ("add", "clamp", "scale"):
        assert outputs[mode] != plain, mode
    # Ablating the most active feature of the tiny circuit moves the distribution without
    # flipping a greedy token: the same tokens come with other logprobs.
    assert outputs["ablate"] != plain or max(abs(a - b) for a, b in zip(logprobs["ablate"], plain_logprobs)) > 1e-3


def test_apply_to_generation_keeps_first_token_and_prompt_changes_it(client):
    plain = token_ids(chat(client))
    generation = token_ids(chat(client, add(1, 3, 12.0, apply_to="generation")))
    prompt_only = token_ids(chat(client, add(1, 3, 12.0, apply_to="prompt")))
    everywhere = token_ids(chat(client, add(1, 3, 12.0)))
    assert generation[0] == plain[0]
    assert generation != plain
    assert prompt_only[0] == everywhere[0] != plain[0]


def test_completions_endpoint_is_steerable(client):
    kwargs = dict(model=MODEL_NAME, prompt="The weather today is", max_tokens=MAX_TOKENS, temperature=0)
    plain = client.completions.create(**kwargs, extra_body={"return_token_ids": True})
    steered = client.completions.create(**kwargs, extra_body={"return_token_ids": True, "steering": add(1, 3, 8.0)})
    assert steered.model_extra["steering"]["features"][0]["index"] == 3
    assert steered.choices[0].model_extra["token_ids"] != plain.choices[0].model_extra["token_ids"]


def test_concurrent_mixed_batch_each_equals_alone(runner_server, runner_client):
    """On both runners (conftest.RUNNERS): each request of a mixed batch gets what it gets alone."""
    server, client = runner_server, runner_client
    specs = [None, add(1, 3, 8.0), add(1, 5, -6.0), add(2, 11, 6.0), None,
             {"features": [{"layer": 2, "index": 9, "mode": "clamp", "value": 20.0}]},
             add(1, 3, 8.0, apply_to="generation"), add(2, 7, 10.0, apply_to="prompt")]
    alone = [token_ids(chat(client, s)) for s in specs]
    together, steps = run_together(server, lambda c, s: token_ids(chat(c, s)), specs)
    assert together == alone
    assert len({tuple(t) for t in alone}) >= 6  # the batch really mixes different outputs
    assert steps <= 2 * MAX_TOKENS, f"{steps} engine steps for 8 requests of {MAX_TOKENS} tokens: not one batch"


def test_concurrent_clients_share_engine_steps(server):
    """Eight clients, three requests each, one after another: the engine runs them in shared
    steps (one at a time would take 576). vLLM's CPU engine core used to spin for worker output
    on the CPU it shares with the API server, and requests then reached the engine one at a
    time, each after the previous one finished (sae_plugins/steerserve_sae/vllm_hooks/upstream_fixes.py)."""
    def three_requests(c, j: int) -> list[int]:
        return [c.completions.create(model=MODEL_NAME, prompt=f"Client {j} asks question {i}:", max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True}).usage.completion_tokens
                for i in range(3)]

    counts, steps = run_together(server, three_requests, list(range(8)))
    assert counts == [[24] * 3] * 8
    assert steps <= 2 * 3 * 24, f"{steps} engine steps for 3 rounds of 24 tokens: the requests did not share steps"


def test_prefix_cache_never_leaks_steered_state(client):
    messages = [{"role": "user", "content": "Describe a quiet morning by the sea, in detail please."}]
    plain_first = token_ids(chat(client, messages=messages))
    steered = token_ids(chat(client, add(1, 3, 8.0), messages=messages))
    plain_again = token_ids(chat(client, messages=messages))
    steered_again = token_ids(chat(client, add(1, 3, 8.0), messages=messages))
    assert plain_again == plain_first
    assert steered_again == steered != plain_first


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def poll_metrics(http, until, timeout: float = 60) -> str:
    """/metrics once `until(text)` holds: worker counters arrive in snapshots that a scrape asks
    for (at most one per second), so a reading is polled for instead of waited for."""
    deadline = time.monotonic() + timeout
    while True:
        text = http.get("/metrics").text
        if until(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def settled_metrics(http, name: str) -> str:
    """/metrics once `name` reads the same in two snapshots (earlier traffic fully counted)."""
    last = []

    def unchanged(text: str) -> bool:
        last.append(metric(text, name))
        return len(last) >= 5 and last[-1] == last[-5]  # the same over > 1 s of snapshots

    return poll_metrics(http, unchanged)


def test_steering_metrics_are_exported(http, client):
    before = settled_metrics(http, "steerserve_steered_tokens_total")
    response = chat(client, add(1, 3, 8.125))  # a spec no other test uses: no prefix-cache hits
    post(http, {"features": [{"layer": 7, "index": 0, "mode": "add", "value": 1}]})
    prompt_len = len(response.model_extra["prompt_token_ids"])
    # every prompt position and every generated token fed back in (all but the last one)
    steered = prompt_len + response.usage.completion_tokens - 1
    tokens = "steerserve_steered_tokens_total"
    after = poll_metrics(http, lambda text: metric(text, tokens) - metric(before, tokens) >= steered)
    assert metric(after, tokens) - metric(before, tokens) == steered
    assert metric(after, "steerserve_steered_requests_total") - metric(before, "steerserve_steered_requests_total") == 1
    assert metric(after, 'steerserve_steering_validation_errors_total{reason="layer_not_loaded"}') >= 1
    stored = 2 * 1024 * 128 * 2 + (1024 + 128) * 2  # W_enc, W_dec, b_enc, b_dec in bf16
    float32_encoder = (1024 * 128 + 1024) * 4  # a small SAE's CPU encode copy (SAEWeights.choose_cpu_encoder)
    panels = 1024 * 128 * 4  # that copy packed for the native kernel (SAEWeights.pack_encoder_panels)
    assert metric(after, 'steerserve_sae_memory_bytes{layer="1"}') == stored + float32_encoder + panels
    assert metric(after, 'steerserve_steering_kernel{kernel="native-cpu"}') == 1
    assert metric(after, "steerserve_sae_layers_loaded") == 2
    assert metric(after, "steerserve_active_steering_configs") == 0
    steering = metric(after, "steerserve_steering_host_seconds_total") - metric(before, "steerserve_steering_host_seconds_total")
    executing = (metric(after, "steerserve_model_execute_host_seconds_total")
                 - metric(before, "steerserve_model_execute_host_seconds_total"))
    assert 0 < steering < executing  # the steering time is spent inside the runner's steps


def test_a_metrics_scrape_refreshes_worker_counters_without_steered_traffic(http, client):
    name = "steerserve_model_execute_host_seconds_total"
    before = metric(settled_metrics(http, name), name)
    chat(client)  # unsteered: the steering middleware schedules no refresh for it; the scrapes do
    assert metric(poll_metrics(http, lambda text: metric(text, name) > before), name) > before


def post(http, steering):
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2, "steering": steering}
    return http.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})


def test_standard_openai_endpoints_still_work(http):
    assert http.get("/health").status_code == 200
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL_NAME]
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    names = {line.split("{")[0].split(" ")[0] for line in metrics.text.splitlines() if not line.startswith("#")}
    assert {"vllm:num_requests_running", "steerserve_steered_requests_total", "steerserve_sae_layers_loaded"} <= names
    tokens = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "the weather"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0


def test_stop_seed_and_response_format_still_work_with_steering(client):
    steering = add(2, 11, 6.0)
    first = chat(client, steering)
    text = first.choices[0].message.content
    stop = text[5:8]
    stopped = chat(client, steering, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    sampled = [chat(client, steering, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    structured = chat(client, steering, response_format={"type": "json_object"}, max_tokens=8)
    assert structured.model_extra["steering"]["id"] == first.model_extra["steering"]["id"]
    assert structured.choices[0].message.content.lstrip().startswith("{")
