"""The analysis API against independent plain-PyTorch computations on the HF model."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch

from tests.conftest import MODEL_NAME, PROMPT

ACT_TOLERANCE = 0.05  # bf16 residual stream, two kernel stacks (observed ~1e-3 relative)
MESSAGES = [{"role": "user", "content": "What is the weather like today? It is cold and windy."}]


def post(http, path, body):
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def inspect(http, **body):
    response = post(http, "/v1/features/inspect", body)
    assert response.status_code == 200, response.text
    return response.json()


def reference_activations(reference, token_ids, layer, steering=None):
    """Dense SAE activations [T, d_sae] of the reference's resid_post at `layer`."""
    _, captured = reference.forward(token_ids, steering, capture=True)
    return reference.encode(layer, captured[layer])


def assert_same_top_features(tokens, dense, layer, top_k):
    for token in tokens:
        features = token["features"][str(layer)]
        assert len(features) == top_k
        ref = dense[token["position"]]
        ref_top = ref.topk(top_k + 1)
        for f in features:
            assert abs(f["activation"] - float(ref[f["index"]])) < ACT_TOLERANCE * max(1.0, float(ref[f["index"]]))
        # nothing the reference ranks clearly higher is missing
        assert features[-1]["activation"] >= float(ref_top.values[top_k - 1]) - ACT_TOLERANCE * 5
        assert features[0]["index"] == int(ref_top.indices[0]) or abs(
            features[0]["activation"] - float(ref_top.values[0])) < ACT_TOLERANCE


def test_inspect_matches_plain_pytorch_encode(http, reference):
    result = inspect(http, messages=MESSAGES, top_k=5)
    token_ids = [t["token_id"] for t in result["tokens"]]
    assert token_ids == reference.chat_prompt_ids(MESSAGES)
    assert result["layers"] == [1, 2] and result["steering"] is None
    assert [t["position"] for t in result["tokens"]] == list(range(len(token_ids)))
    assert result["tokens"][0]["token"] == "<|im_start|>" and result["tokens"][0]["special"] is True
    assert result["tokens"][2]["special"] is False
    for layer in (1, 2):
        dense = reference_activations(reference, token_ids, layer)
        assert_same_top_features(result["tokens"], dense, layer, 5)
        aggregate = result["aggregate"][str(layer)]
        ordinary = [t["position"] for t in result["tokens"] if not t["special"]]
        assert aggregate["num_tokens"] == len(ordinary)
        top = aggregate["by_max"][0]
        ref_max = dense[ordinary].max(dim=0).values
        assert abs(top["max_activation"] - float(ref_max.max())) < ACT_TOLERANCE * float(ref_max.max())
        assert top["count"] == int((dense[ordinary][:, top["index"]] > 0).sum())
        by_mean = aggregate["by_mean"]
        assert [h["mean_activation"] for h in by_mean] == sorted((h["mean_activation"] for h in by_mean), reverse=True)


def test_inspect_reports_watched_features_at_every_token(http, reference):
    """`watch` reports chosen features whether or not they are in a token's top-k: exact
    values from the same encode, including zeros."""
    dense = reference_activations(reference, reference.chat_prompt_ids(MESSAGES), 2)
    watch = [int(dense[-1].argmax()), 700, 1000]  # one feature active at the last token, two others
    result = inspect(http, messages=MESSAGES, top_k=1, layers=[2], watch=watch)
    nonzero = 0
    for token in result["tokens"]:
        watched = token["watched"]["2"]
        assert [w["index"] for w in watched] == watch
        for w in watched:
            ref = float(dense[token["position"], w["index"]])
            assert abs(w["activation"] - ref) < ACT_TOLERANCE * max(1.0, ref)
            nonzero += w["activation"] > 0
    assert nonzero > 0  # not only zeros: the check compares real activations
    bad = post(http, "/v1/features/inspect", {"messages": MESSAGES, "layers": [2], "watch": [5000]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "watch[0]"


def test_inspect_next_token_logprobs_match_the_reference(http, reference):
    """Position i lists the top 5 predictions of token i+1 plus that token, as the reference's
    log-softmax gives them (the circuit decides with margins of several logits)."""
    result = inspect(http, messages=MESSAGES, top_k=1, layers=[1], next_token_logprobs=5)
    ids = [t["token_id"] for t in result["tokens"]]
    with torch.no_grad():
        logprobs = torch.log_softmax(reference.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    listed = result["next_token_logprobs"]
    assert len(listed) == len(ids) - 1
    for i, entry in enumerate(listed):
        top5 = logprobs[i].topk(5).indices.tolist()
        assert str(ids[i + 1]) in entry and str(top5[0]) in entry and 5 <= len(entry) <= 6
        for token, value in entry.items():  # bf16 logits: steps of 0.125 at |logit| 16-32
            expected = float(logprobs[i, int(token)])
            assert value == pytest.approx(expected, abs=max(0.1, 0.02 * abs(expected)))
    assert result["nll"] == pytest.approx(-sum(entry[str(t)] for entry, t in zip(listed, ids[1:])) / len(listed))


def test_inspect_a_steered_forward(http, reference):
    steering = {"features": [{"layer": 1, "index": 600, "mode": "add", "value": 8.0}]}
    result = inspect(http, messages=MESSAGES, top_k=5, steering=steering)
    assert result["steering"]["features"][0]["index"] == 600
    token_ids = [t["token_id"] for t in result["tokens"]]
    plain = inspect(http, messages=MESSAGES, top_k=5)
    for layer in (1, 2):
        dense = reference_activations(reference, token_ids, layer, steering["features"])
        assert_same_top_features(result["tokens"], dense, layer, 5)
    assert result["tokens"][-1]["features"]["1"] != plain["tokens"][-1]["features"]["1"]


def test_inspect_prompt_text_and_layer_subset(http, reference):
    result = inspect(http, prompt="The weather today is cold", layers=[2], top_k=3)
    assert list(result["aggregate"]) == ["2"]
    token_ids = [t["token_id"] for t in result["tokens"]]
    assert token_ids == reference.tokenizer("The weather today is cold")["input_ids"]
    assert_same_top_features(result["tokens"], reference_activations(reference, token_ids, 2), 2, 3)


def test_concurrent_inspections_each_equal_alone(runner_http):
    http = runner_http
    bodies = [
        {"messages": MESSAGES, "top_k": 4},
        {"prompt": "The weather today is cold", "top_k": 4},
        {"messages": PROMPT, "top_k": 4, "steering": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 9}]}},
        {"messages": MESSAGES, "top_k": 4, "steering": {"features": [{"layer": 2, "index": 5, "mode": "ablate"}]}},
    ]
    alone = [inspect(http, **b) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: inspect(http, **b), bodies))
    for a, b in zip(alone, together):
        assert [t["features"] for t in a["tokens"]] == [t["features"] for t in b["tokens"]]


@pytest.mark.parametrize("body,status,param,code", [
    ({"messages": MESSAGES, "layers": [1, 3]}, 400, "layers[1]", "layer_not_loaded"),
    ({"messages": MESSAGES, "top_k": 0}, 400, "top_k", "invalid_top_k"),
    ({"messages": MESSAGES, "top_k": 101}, 400, "top_k", "invalid_top_k"),
    ({"messages": MESSAGES, "prompt": "both"}, 400, "messages", "invalid_request"),
    ({}, 400, "messages", "invalid_request"),
    ({"prompt": "hi", "colour": "red"}, 400, "colour", "invalid_request"),
    ({"prompt": "hi", "top_k": "5"}, 400, "top_k", "invalid_request"),
    ({"prompt": "hi", "next_token_logprobs": 21}, 400, "next_token_logprobs", "invalid_request"),
    ({"prompt": "hi", "next_token_logprobs": -1}, 400, "next_token_logprobs", "invalid_request"),
    ({"prompt": "hi", "next_token_logprobs": "5"}, 400, "next_token_logprobs", "invalid_request"),
    ({"prompt": "hi", "next_token_logprobs": True}, 400, "next_token_logprobs", "invalid_request"),
    ({"prompt": " weather" * 1100}, 400, "prompt", "too_many_tokens"),
    ({"prompt": "hi", "steering": {"features": [{"layer": 3, "index": 1, "mode": "add", "value": 1}]}},
     400, "steering.features[0].layer", "layer_not_loaded"),
])
def test_inspect_errors(http, body, status, param, code):
    response = post(http, "/v1/features/inspect", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_feature_lookup_logit_lens_matches_plain_pytorch(http, reference):
    layer, index = 1, 40
    result = http.get(f"/v1/features/{layer}/{index}").json()
    sae = reference.sae(layer)
    direction = sae.directions[index]  # reference SAE: directions [d_sae, d_model], W_enc [d_sae, d_model]
    with torch.no_grad():
        logits = reference.model.lm_head(reference.model.model.norm(direction.to(torch.bfloat16)[None]))[0].float()
    promoted = [t["token_id"] for t in result["logit_lens"]["promoted"]]
    suppressed = [t["token_id"] for t in result["logit_lens"]["suppressed"]]
    assert len(promoted) == len(suppressed) == 20
    assert promoted[:5] == logits.topk(5).indices.tolist()
    assert suppressed[:5] == (-logits).topk(5).indices.tolist()
    for entry in result["logit_lens"]["promoted"]:
        assert abs(entry["logit"] - float(logits[entry["token_id"]])) < 0.1
        assert entry["token"] == reference.tokenizer.decode([entry["token_id"]])
    w_dec = direction
    w_enc = sae.W_enc[index]
    assert abs(result["decoder_norm"] - float(w_dec.norm())) < 1e-3
    assert abs(result["encoder_decoder_cosine"] - float(torch.cosine_similarity(w_enc, w_dec, dim=0))) < 1e-3
    assert result["label"] is None and result["description"] is None
    labelled = http.get("/v1/features/2/9").json()
    assert (labelled["label"], labelled["description"]) == ("Weather", "the word weather")


@pytest.mark.parametrize("path,param,code", [
    ("/v1/features/3/0", "layer", "layer_not_loaded"),
    ("/v1/features/1/1024", "index", "index_out_of_range"),
])
def test_feature_lookup_errors(http, path, param, code):
    response = http.get(path)
    assert response.status_code == 404
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


def test_label_search_is_ranked_and_paginated(http):
    result = http.get("/v1/features/search", params={"q": "WEATHER"}).json()
    assert [(h["layer"], h["index"]) for h in result["data"]] == [(2, 9), (1, 3), (1, 10), (2, 20)]
    assert result["total"] == 4 and result["has_more"] is False
    page = http.get("/v1/features/search", params={"q": "weather", "limit": 2, "offset": 1}).json()
    assert [(h["layer"], h["index"]) for h in page["data"]] == [(1, 3), (1, 10)]
    assert page["has_more"] is True
    only_layer_1 = http.get("/v1/features/search", params={"q": "weather", "layer": 1}).json()
    assert [(h["layer"], h["index"]) for h in only_layer_1["data"]] == [(1, 3), (1, 10)]
    assert http.get("/v1/features/search", params={"q": "zebra"}).json()["data"] == []


def test_token_search_matches_plain_pytorch(http, reference):
    token = " weather"
    (token_id,) = reference.tokenizer.encode(token, add_special_tokens=False)
    result = http.get("/v1/features/search", params={"token": token, "limit": 10}).json()
    norm = reference.model.model.norm
    unembed = reference.model.lm_head.weight[token_id].float()
    scores = []
    with torch.no_grad():
        for layer in (1, 2):
            sae = reference.sae(layer)
            rows = sae.directions.to(torch.bfloat16)
            logits = norm(rows).float() @ unembed
            scores += [(float(v), layer, i) for i, v in enumerate(logits)]
    scores.sort(key=lambda s: (-s[0], s[1], s[2]))
    assert [(h["layer"], h["index"]) for h in result["data"][:3]] == [(s[1], s[2]) for s in scores[:3]]
    for hit in result["data"]:
        assert hit["token"] == token
    assert result["data"][0]["logit"] == pytest.approx(scores[0][0], abs=0.1)
    restricted = http.get("/v1/features/search", params={"token": token, "layer": 2, "limit": 3}).json()
    assert {h["layer"] for h in restricted["data"]} == {2}


@pytest.mark.parametrize("params,param,code", [
    ({"token": "weather forecast"}, "token", "not_a_single_token"),
    ({"token": " weather", "layer": 3}, "layer", "layer_not_loaded"),
    ({}, "q", "invalid_request"),
    ({"q": "x", "limit": 0}, "limit", "invalid_request"),
])
def test_search_errors(http, params, param, code):
    response = http.get("/v1/features/search", params=params)
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


def test_compare_returns_the_unsteered_baseline(client):
    steering = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}
    kwargs = dict(model=MODEL_NAME, messages=PROMPT, max_tokens=12, temperature=0)
    compared = client.chat.completions.create(**kwargs, extra_body={"steering": {**steering, "compare": True},
                                                                    "return_token_ids": True})
    plain = client.chat.completions.create(**kwargs, extra_body={"return_token_ids": True})
    steered = client.chat.completions.create(**kwargs, extra_body={"steering": steering, "return_token_ids": True})
    baseline = compared.model_extra["baseline"]
    assert baseline["choices"][0]["token_ids"] == plain.choices[0].model_extra["token_ids"]
    assert baseline["choices"][0]["message"]["content"] == plain.choices[0].message.content
    assert "steering" not in baseline
    assert compared.choices[0].model_extra["token_ids"] == steered.choices[0].model_extra["token_ids"]
    assert compared.model_extra["steering"] == steered.model_extra["steering"]


def test_compare_with_stream_is_rejected(http):
    body = {"model": MODEL_NAME, "messages": PROMPT, "stream": True,
            "steering": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}], "compare": True}}
    response = post(http, "/v1/chat/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "steering.compare"


class _Tokenizer:
    def encode(self, text, add_special_tokens=False):
        return [len(text)]

    def decode(self, ids):
        return f"<{ids[0]}>"


class _Engine:
    """The two things token search asks of vLLM: a tokenizer, and every feature's logit for the token."""

    def __init__(self):
        self.calls = 0

    def get_tokenizer(self):
        return _Tokenizer()

    async def collective_rpc(self, method, args):
        token, layers, wanted = args
        self.calls += 1
        return [{layer: [(i, float(token * 1000 + layer * 100 - i)) for i in range(wanted)] for layer in layers}]


def test_token_search_cache_is_bounded_in_bytes():
    """Each cached search is charged its estimated size (checked against what tracemalloc sees it
    allocate); least recently used searches go once the cache passes its byte budget, and a
    search bigger than the whole budget is answered but not kept."""
    import asyncio
    import tracemalloc

    from steerserve.context import SteeringContext
    from steerserve.limits import Limits
    from steerserve.routers.features import _token_search
    from steerserve.token_search_cache import TokenSearchCache

    def context(budget: int) -> SteeringContext:
        return SteeringContext(saes=[{"layer": layer, "d_sae": 20_000, "d_model": 8} for layer in range(8)],
                               max_features=4, admission=None, engine=_Engine(),
                               limits=Limits(token_search_cache_bytes=budget))

    big = context(10 * 2**20)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    hits = asyncio.run(_token_search(big, "abc", None, 10_100))  # 8 layers, offset 10,000: issue 28's 27 MB
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(hits) == 8 * 10_100 and hits[0] == {"layer": 7, "index": 0, "logit": 3700.0, "label": None,
                                                   "description": None, "token": "<3>"}
    cache = big.token_search_cache
    assert isinstance(cache, TokenSearchCache) and len(cache) == 0 and cache.nbytes == 0  # over the budget: not kept
    estimate = TokenSearchCache.entry_bytes(hits)
    assert 0.8 * held < estimate < 1.25 * held, (estimate, held)
    budget = estimate // 8 * 3 + 1000  # room for 3 searches of one layer at this depth
    small = context(budget)
    for token in ("a", "bb", "ccc", "a", "dddd"):  # "a" used again: "bb" is the least recently used
        asyncio.run(_token_search(small, token, 0, 10_100))
    cache = small.token_search_cache
    assert [key[0] for key in cache] == [3, 1, 4] and small.engine.calls == 4
    assert cache.nbytes == sum(map(TokenSearchCache.entry_bytes, cache.values())) <= budget
