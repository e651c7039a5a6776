"""`POST /v1/features/contrast` on the shared tiny-model server, against the independent Hugging
Face reference: the features ranked by the difference of their mean activation between two sets
of texts, and the mean-difference (CAA) direction; `save_as` stores it; the 400s. And on the
default model, German against English texts finds the German feature.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from tests.conftest import MODEL_NAME, PROMPT

POSITIVE = ["The rain fell on the quiet town all night.", "Storm clouds gathered over the hills."]
NEGATIVE = ["She baked fresh bread every morning.", "The bakery sold warm rolls and cakes."]


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def greedy(client, model: str, steering: dict | None = None) -> tuple[list[int], list[float]]:
    extra = {"return_token_ids": True, "ignore_eos": True} | ({"steering": steering} if steering else {})
    choice = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0, logprobs=True,
                                            extra_body=extra).choices[0]
    return list(choice.model_extra["token_ids"]), [t.logprob for t in choice.logprobs.content]


def reference_means(http, reference, texts: list[str], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Per text, the mean SAE activations and mean stream over its non-special tokens."""
    special = set(reference.tokenizer.all_special_ids)
    features, streams = [], []
    for text in texts:
        ids = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": text}).raise_for_status().json()["tokens"]
        stream = reference.residual_stream(ids)[layer]
        keep = torch.tensor([t not in special for t in ids])
        features.append(reference.encode(layer, stream[keep]).float().mean(dim=0).numpy())
        streams.append(stream[keep].float().mean(dim=0).numpy())
    return np.stack(features), np.stack(streams)


def test_contrast_matches_the_reference_and_saves_the_direction(http, client, reference):
    response = http.post("/v1/features/contrast", json={"positive": POSITIVE, "negative": NEGATIVE, "layers": [2, 1],
                                                        "top_k": 5, "save_as": "rain-vs-bread"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["layers"] == [1, 2] and result["positive"]["texts"] == 2 and result["saved"] == {
        "vector": "rain-vs-bread", "preset": "rain-vs-bread"}
    for layer in (1, 2):
        p_f, p_s = reference_means(http, reference, POSITIVE, layer)
        n_f, n_s = reference_means(http, reference, NEGATIVE, layer)
        diff = p_f.mean(0) - n_f.mean(0)
        got = result["contrast"][str(layer)]
        top = got["features"][0]
        assert [f["difference"] for f in got["features"]] == sorted((f["difference"] for f in got["features"]),
                                                                    reverse=True)
        assert top["index"] == int(np.argmax(diff)), (top, np.sort(diff)[-3:])
        assert top["difference"] == pytest.approx(float(diff.max()), rel=0.05)
        assert top["positive_mean"] == pytest.approx(float(p_f.mean(0)[top["index"]]), rel=0.05, abs=0.05)
        expected = p_s.mean(0) - n_s.mean(0)
        direction = decode(got["direction"]["vector"])
        cosine = float(direction @ expected / np.linalg.norm(direction) / np.linalg.norm(expected))
        assert cosine > 0.99 and got["direction"]["norm"] == pytest.approx(float(np.linalg.norm(expected)), rel=0.05)
        stored = http.get("/v1/steering/vectors/rain-vs-bread").json()
        assert next(e for e in stored["layers"] if e["layer"] == layer)["vector"] == got["direction"]["vector"]
    inline = [{"layer": layer, "vector": result["contrast"][str(layer)]["direction"]["vector"], "mode": "add",
               "value": 1.0} for layer in (1, 2)]
    assert greedy(client, "rain-vs-bread") == greedy(client, MODEL_NAME, {"vectors": inline}) != greedy(client, MODEL_NAME)
    again = http.post("/v1/features/contrast", json={"positive": POSITIVE, "negative": NEGATIVE, "layers": [1],
                                                     "save_as": "rain-vs-bread"})
    assert again.status_code == 409 and again.json()["error"]["param"] == "save_as", again.text
    assert http.delete("/v1/steering/presets/rain-vs-bread").status_code == 200
    assert http.delete("/v1/steering/vectors/rain-vs-bread").status_code == 200


def test_identical_sets_contrast_to_nothing(http):
    result = http.post("/v1/features/contrast", json={"positive": POSITIVE, "negative": POSITIVE, "layers": [1],
                                                      "top_k": 3}).json()
    layer = result["contrast"]["1"]
    assert layer["direction"]["norm"] == 0.0 and all(f["difference"] == 0.0 for f in layer["features"])


@pytest.mark.parametrize("body, param, code", [
    ({"positive": [], "negative": ["a"]}, "positive", "invalid_request"),
    ({"positive": ["a"]}, "negative", "invalid_request"),
    ({"positive": ["a"], "negative": ["b"], "layers": [7]}, "layers[0]", "layer_not_loaded"),
    ({"positive": ["a"], "negative": ["b"], "top_k": 0}, "top_k", "invalid_request"),
    ({"positive": ["a"] * 65, "negative": ["b"]}, "positive", "too_many_examples"),
    ({"positive": ["a"], "negative": [""]}, "negative[0]", None),
    ({"positive": ["a"], "negative": ["b"], "save_as": "no spaces"}, "save_as", "invalid_vector_name"),
    ({"positive": [5], "negative": ["b"]}, "positive[0]", "invalid_request"),
    ({"positive": ["a"], "negative": ["b"], "save_as": ".."}, "save_as", "invalid_vector_name"),
    ({"positive": ["a"], "negative": ["b"], "save_as": "."}, "save_as", "invalid_vector_name"),
])
def test_bad_contrast_requests(http, body, param, code):
    response = http.post("/v1/features/contrast", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code), error


def test_an_example_of_special_tokens_only_is_refused(http):
    response = http.post("/v1/features/contrast", json={"positive": ["a", "<|im_start|><|im_end|>"], "negative": ["b"]})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": "positive[1] has no tokens but special ones",
                                        "type": "invalid_request_error", "param": "positive[1]",
                                        "code": "invalid_request"}


def test_save_as_may_not_take_a_served_models_name(http):
    response = http.post("/v1/features/contrast", json={"positive": ["a"], "negative": ["b"], "save_as": MODEL_NAME})
    assert response.status_code == 409, response.text
    assert response.json()["error"] == {"message": f"{MODEL_NAME!r} is the name of a served model or LoRA adapter",
                                        "type": "invalid_request_error", "param": "save_as",
                                        "code": "model_name_taken"}


GERMAN = ["Wer andere kennt, ist klug.", "Das Wetter ist heute sehr schön.", "Ich gehe morgen in die Stadt."]
ENGLISH = ["He who knows others is wise.", "The weather is very nice today.", "I am going to town tomorrow."]


def test_german_against_english_finds_the_german_feature(default_server):
    """On the default model: the feature labelled German (3:424) tops the contrast at layer 3
    (the example of docs/analysis.md)."""
    import httpx

    from tests.conftest import AUTH

    with httpx.Client(base_url=default_server.base_url, headers=AUTH, timeout=300) as http:
        response = http.post("/v1/features/contrast", json={"positive": GERMAN, "negative": ENGLISH, "layers": [3],
                                                            "top_k": 3, "save_as": "german-caa"})
        assert response.status_code == 200, response.text
        top = response.json()["contrast"]["3"]["features"][0]
        assert (top["index"], top["label"]) == (424, "German"), response.json()["contrast"]["3"]["features"]
        assert top["positive_mean"] > top["negative_mean"] and top["t"] > 0
        print("\n" + json.dumps(response.json()["contrast"]["3"]["features"][:2]), json.dumps(
            {k: v for k, v in response.json()["contrast"]["3"]["direction"].items() if k == "norm"}))
        http.delete("/v1/steering/vectors/german-caa")
