"""Direction vectors at a layer without an SAE (`--steering-layers`), over real HTTP on one compiled
server with an SAE at layer 1 only and layer 2 named for vectors: vector edits there (alone,
gated by a layer-1 feature, beside layer-1 features) equal the independent Hugging Face
reference and change the output; a mixed batch of feature, vector-only-layer and unsteered
requests each equal their solo run; the layer is reported by /v1/saes; anything that needs an
SAE there (a feature, a gate, inspect, trace, contrast, the features API) is a clear 400 (404 for
the feature page, as for any layer without an SAE). A server with no SAE at all is in
test_vector_layers_without_sae.py.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AUTH, MODEL_NAME, PROMPT, openai_client, serve_args, serving
from tests.test_differential import assert_server_matches_reference, server_greedy
from tests.test_vector_steering import assert_batch_equals_solo, vec

VECTOR_LAYER = 2  # no SAE here in this module's server


@pytest.fixture(scope="module")
def vector_server(tiny_model_dir, tmp_path_factory):
    args = serve_args(tiny_model_dir, "--data-dir", str(tmp_path_factory.mktemp("vector-layers-data")),
                      "--steering-layers", str(VECTOR_LAYER), "--api-key", "steerserve-test-key")
    args[args.index("--sae-layers") + 1] = "1"
    with serving(args, tmp_path_factory.mktemp("vector-layers") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def vclient(vector_server):
    return openai_client(vector_server)


@pytest.fixture(scope="module")
def vhttp(vector_server):
    with httpx.Client(base_url=vector_server.base_url, timeout=300, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def directions(reference, active_features) -> dict[str, object]:
    """Layer 2's most active feature's decoder row (a direction the stream there has a large
    projection on: capping or ablating it changes the output), feature 3's row at layer 1, and
    layer 2's stream at the last prompt position with its norm."""
    last2 = reference.residual_stream(reference.chat_prompt_ids(PROMPT))[2][-1]
    return {"top2": reference.sae(2).directions[active_features[2][0]], "a1": active_features[1],
            "d3": reference.sae(1).directions[3], "last2": last2, "norm2": float(last2.norm())}


def cases(d) -> dict[str, dict]:
    at = VECTOR_LAYER
    return {
        "add": {"vectors": [vec(at, d["d3"], "add", 6.0)]},
        "cap": {"vectors": [vec(at, d["top2"], "cap", 0.0)]},
        "ablate": {"vectors": [vec(at, d["top2"], "ablate")]},
        "cap-gated-beside-features": {
            "features": [{"layer": 1, "index": 3, "mode": "add", "value": 4.0}],
            "vectors": [vec(at, d["last2"], "cap", 0.2 * d["norm2"], when={"layer": 1, "index": d["a1"][0], "above": 0.5})]},
    }


def test_the_vector_only_layer_is_reported(vhttp):
    listed = vhttp.get("/v1/saes").json()
    assert [s["layer"] for s in listed["data"]] == [1]
    assert listed["vector_layers"] == [VECTOR_LAYER] and listed["d_model"] == listed["data"][0]["d_model"]


@pytest.mark.parametrize("name", ["add", "cap", "ablate", "cap-gated-beside-features"])
def test_vectors_at_a_layer_without_an_sae_match_the_reference(vclient, reference, directions, name):
    steering = cases(directions)[name]
    assert_server_matches_reference(vclient, reference, steering)
    assert server_greedy(vclient, steering)[1] != server_greedy(vclient, None)[1], "the case does not steer"


def test_mixed_batch_with_a_vector_only_layer(vector_server, vclient, directions):
    c = cases(directions)
    specs = [None, {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}, c["cap"], c["add"],
             c["cap-gated-beside-features"], None]
    assert_batch_equals_solo(vector_server, vclient, specs)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def chat(vhttp, **fields) -> httpx.Response:
    return vhttp.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2,
                                                    **fields})


def test_what_needs_an_sae_is_refused_at_the_vector_only_layer(vhttp, directions):
    d3 = directions["d3"]
    neither = error_of(chat(vhttp, steering={"vectors": [vec(1, d3, "add", 1.0), vec(3, d3, "add", 1.0)]}))
    assert neither["code"] == "layer_not_loaded" and neither["param"] == "steering.vectors[1].layer"
    assert "vectors may steer layers [1, 2]" in neither["message"]
    feature = error_of(chat(vhttp, steering={"features": [{"layer": 2, "index": 3, "mode": "add", "value": 1.0}]}))
    assert (feature["code"], feature["param"]) == ("layer_not_loaded", "steering.features[0].layer")
    assert "direction vectors only" in feature["message"]
    gated = error_of(chat(vhttp, steering={"vectors": [vec(2, d3, "add", 1.0, when={"layer": 2, "index": 3,
                                                                                     "above": 0.0})]}))
    assert (gated["code"], gated["param"]) == ("layer_not_loaded", "steering.vectors[0].when.layer")
    traced = error_of(chat(vhttp, trace={"layers": [2]}))
    assert (traced["code"], traced["param"]) == ("layer_not_loaded", "trace.layers[0]")
    inspected = error_of(vhttp.post("/v1/features/inspect", json={"prompt": "the weather", "layers": [1, 2]}))
    assert (inspected["code"], inspected["param"]) == ("layer_not_loaded", "layers[1]")
    contrasted = error_of(vhttp.post("/v1/features/contrast", json={"positive": ["sun"], "negative": ["rain"],
                                                                    "layers": [2]}))
    assert (contrasted["code"], contrasted["param"]) == ("layer_not_loaded", "layers[0]")
    assert error_of(vhttp.get("/v1/features/2/3"), 404)["code"] == "layer_not_loaded"
    ok = chat(vhttp, steering={"vectors": [vec(2, d3, "add", 1.0)]})  # and the server still serves
    assert ok.status_code == 200 and ok.json()["steering"]["vectors"][0]["layer"] == 2
