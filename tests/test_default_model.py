"""The shipped default model (issue 13): a trained Qwen3.5 with trained Qwen-Scope-format SAEs and
automatic labels, served exactly as `make serve` serves it.

Checks what a newcomer sees: the files load like the real release, label search finds the
language features, clamping one turns English answers into that language (judged by `lingua`
and function words, not by our own statistics), and steering on it keeps the isolation, streaming and error
behaviour of the fixture model.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.conftest import API_KEY, AUTH, ROOT, openai_client

MODEL_DIR = ROOT / "models" / "fortunes-qwen3.5"
REPORT = json.loads((MODEL_DIR / "build_report.json").read_text())
LAYERS = (1, 2, 3)
NAME = "fortunes-qwen3.5"


def test_files_are_the_qwen_scope_format():
    from steerserve_sae.sae.loading import describe_format, discover_sae_layers, load_sae_layer

    assert describe_format(MODEL_DIR / "sae") == "qwen-scope"
    assert sorted(discover_sae_layers(MODEL_DIR / "sae")) == list(LAYERS)
    for layer in LAYERS:
        raw = torch.load(MODEL_DIR / "sae" / f"layer{layer}.sae.pt", weights_only=True)
        assert {k: tuple(v.shape) for k, v in raw.items()} == {
            "W_enc": (1024, 256), "W_dec": (256, 1024), "b_enc": (1024,), "b_dec": (256,)}
        load_sae_layer(MODEL_DIR / "sae", layer, d_model=256, dtype=torch.float32, device="cpu")


def test_build_report_meets_the_quality_bar():
    lm = REPORT["language_model"]
    assert lm["held_out_loss"] < lm["unigram_loss"] - 1.5  # nats per token
    for layer in LAYERS:
        assert REPORT["saes"]["layers"][str(layer)]["held_out_fvu"] < 0.2
    found = REPORT["labels"]["language_features"]
    qualified = [lang for lang in ("en", "de", "es", "it") if any(found[str(layer)][lang]["qualifies"] for layer in LAYERS)]
    assert len(qualified) == 4, found


def test_fvu_recomputed_from_the_shipped_files():
    """FVU of each shipped SAE on fresh text through the shipped model, from the format's own
    definition (ReLU then top-k, no b_dec subtraction), with plain PyTorch hooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    text = (ROOT / "server" / "steerserve" / "analysis" / "data" / "eval_texts.txt").read_text()
    ids = torch.tensor([tok(text).input_ids[:1024]])
    streams = {}
    hooks = [model.model.layers[layer].register_forward_hook(
        lambda _m, _i, out, layer=layer: streams.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)[0]))
        for layer in LAYERS]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    k = json.loads((MODEL_DIR / "sae" / "config.json").read_text())["k"]
    for layer in LAYERS:
        sae = torch.load(MODEL_DIR / "sae" / f"layer{layer}.sae.pt", weights_only=True)
        x = streams[layer]
        pre = torch.relu(x @ sae["W_enc"].T + sae["b_enc"])
        vals, idx = pre.topk(k, dim=-1)
        x_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae["W_dec"].T + sae["b_dec"]
        fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        assert fvu < 0.25, (layer, fvu)


@pytest.fixture(scope="module")
def http(default_server):
    with httpx.Client(base_url=default_server.base_url, headers=AUTH, timeout=300) as client:
        yield client


def language_feature(http, name: str) -> dict:
    hits = http.get("/v1/features/search", params={"q": name}).raise_for_status().json()["data"]
    assert hits and hits[0]["label"] == name, hits[:3]
    return hits[0]


def five_times_mean(feature: dict) -> float:
    """The clamp that switches most answers (bench/language_steering.py: 2x and 3x move few)."""
    from models.recipe.corpus import LANGUAGE_NAMES
    from models.recipe.language_steering import clamp_value

    language = next(code for code, name in LANGUAGE_NAMES.items() if name == feature["label"])
    return clamp_value(REPORT, feature["layer"], language, 5)


def chat(http, content: str, steering=None, **extra) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, **extra}
    if steering:
        body["steering"] = steering
    return http.post("/v1/chat/completions", json=body).raise_for_status().json()


def test_clamping_a_language_feature_switches_the_answer_language(default_server, http):
    from models.recipe.language_steering import ENGLISH_PROMPTS, measure

    feature = language_feature(http, "German")
    result = measure(default_server.base_url, NAME, feature["layer"], feature["index"], five_times_mean(feature), "de",
                     api_key=API_KEY, max_tokens=24)
    print(json.dumps(result.examples[:3], ensure_ascii=False, indent=1))
    assert len(result.steered) == len(ENGLISH_PROMPTS) == 20
    assert result.share("unsteered", "en") >= 0.75, result.unsteered
    assert result.share("steered", "de") >= 0.6, result.steered


def test_steering_is_isolated_and_streams_the_same(http):
    feature = language_feature(http, "Spanish")
    steering = {"features": [{"layer": feature["layer"], "index": feature["index"], "mode": "clamp",
                              "value": five_times_mean(feature)}]}
    alone_plain = chat(http, "Tell me a joke.")["choices"][0]["message"]["content"]
    alone_steered = chat(http, "Tell me a joke.", steering)["choices"][0]["message"]["content"]
    assert alone_plain != alone_steered
    with ThreadPoolExecutor(8) as pool:  # steered and unsteered requests share engine steps
        jobs = [pool.submit(chat, http, "Tell me a joke.", steering if i % 2 else None) for i in range(8)]
        outs = [j.result()["choices"][0]["message"]["content"] for j in jobs]
    assert outs == [alone_steered if i % 2 else alone_plain for i in range(8)]
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a joke."}], "max_tokens": 24,
            "temperature": 0, "stream": True, "steering": steering}
    text = ""
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert chunk["steering"]["features"][0]["index"] == feature["index"]
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
    assert text == alone_steered


def test_bad_steering_is_a_400(http):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "steering": {"features": [{"layer": 0, "index": 0, "mode": "add", "value": 1}]}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "layer_not_loaded"
    body["steering"]["features"][0] |= {"layer": 1, "index": 1024}
    assert http.post("/v1/chat/completions", json=body).json()["error"]["code"] == "index_out_of_range"


def test_gated_clamp_and_trace_through_the_openai_client(default_server, http):
    """Conditional steering and a trace on the default model through the official client:
    clamp German only where the English feature is active. The trace (after the edit) shows
    German at the clamp value on exactly the tokens the gate report counts; concurrent gated,
    traced and plain requests each get what they get alone."""
    client = openai_client(default_server)
    german, english = language_feature(http, "German"), language_feature(http, "English")
    value = five_times_mean(german)
    steering = {"features": [{"layer": german["layer"], "index": german["index"], "mode": "clamp", "value": value,
                              "when": {"layer": english["layer"], "index": english["index"], "above": 1.0}}]}
    trace = {"layers": [german["layer"]], "top_k": 5, "positions": "all"}

    def ask(steered: bool, traced: bool):
        extra = {"steering": steering} if steered else {}
        return client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24, temperature=0,
            extra_body=extra | ({"trace": trace} if traced else {}))

    gated = ask(True, True)
    echo = gated.model_extra["steering"]
    edited, steered_tokens = echo["features"][0]["edited_tokens"], echo["steered_tokens"]
    assert 0 < edited < steered_tokens, echo
    entries = gated.choices[0].model_extra["trace"]
    assert len(entries) == steered_tokens  # positions "all": every computed position
    clamped = [e for e in entries
               if any(x["index"] == german["index"] and x["activation"] > 0.7 * value
                      for x in e["features"][str(german["layer"])])]
    assert len(clamped) == edited
    plain = ask(False, False).choices[0].message.content
    ungated = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24, temperature=0,
        extra_body={"steering": {"features": [{k: v for k, v in steering["features"][0].items() if k != "when"}]}})
    assert gated.choices[0].message.content not in (plain, ungated.choices[0].message.content)
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(ask, i % 2 == 0, i % 3 == 0) for i in range(6)]
        outs = [j.result().choices[0].message.content for j in jobs]
    assert outs == [gated.choices[0].message.content if i % 2 == 0 else plain for i in range(6)]
