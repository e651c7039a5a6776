"""A model with no SAE at all, steered by direction vectors at the layer `--steering-layers` names:
`add`, `cap` and `ablate` equal the independent Hugging Face reference and change the output;
what needs an SAE is refused. The server runs eager (--enforce-eager) to spare CI a second
compile: the compiled path of a layer without an SAE is test_vector_layers.py's.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AUTH, MODEL_NAME, PROMPT, openai_client, serve_args, serving
from tests.test_differential import assert_server_matches_reference, server_greedy
from tests.test_vector_steering import vec


@pytest.fixture(scope="module")
def plain_vector_server(tiny_model_dir, tmp_path_factory):
    args = serve_args(tiny_model_dir, "--data-dir", str(tmp_path_factory.mktemp("no-sae-vectors-data")),
                      "--steering-layers", "1", "--api-key", "steerserve-test-key", "--enforce-eager")
    at = args.index("--sae")
    del args[at: at + 4]  # drop --sae DIR --sae-layers L
    with serving(args, tmp_path_factory.mktemp("no-sae-vectors") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def pclient(plain_vector_server):
    return openai_client(plain_vector_server)


@pytest.fixture(scope="module")
def top1(reference, active_features):
    """Layer 1's most active feature's decoder row: a direction of the stream there (from the SAE
    files of the fixture, which this server does not load)."""
    return reference.sae(1).directions[active_features[1][0]]


@pytest.mark.parametrize("mode, value", [("add", 4.0), ("cap", -2.0), ("ablate", None)])
def test_vectors_steer_a_model_without_saes_like_the_reference(pclient, reference, top1, mode, value):
    steering = {"vectors": [vec(1, top1 * (2.0 if mode == "add" else 1.0), mode, value)]}
    assert_server_matches_reference(pclient, reference, steering)
    assert server_greedy(pclient, steering)[1] != server_greedy(pclient, None)[1], "the case does not steer"


def test_only_vectors_at_the_named_layer(plain_vector_server, top1):
    with httpx.Client(base_url=plain_vector_server.base_url, timeout=300, headers=AUTH) as http:
        assert http.get("/v1/saes").json() == {"object": "list", "data": [], "vector_layers": [1],
                                               "d_model": top1.numel()}
        chat = lambda steering: http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2, "steering": steering})
        elsewhere = chat({"vectors": [vec(2, top1, "add", 1.0)]})
        assert elsewhere.status_code == 400 and elsewhere.json()["error"]["param"] == "steering.vectors[0].layer"
        assert "vectors may steer layers [1]" in elsewhere.json()["error"]["message"]
        feature = chat({"features": [{"layer": 1, "index": 3, "mode": "add", "value": 1.0}]})
        assert feature.status_code == 400 and feature.json()["error"]["code"] == "layer_not_loaded"
        inspect = http.post("/v1/features/inspect", json={"prompt": "the weather"})
        assert inspect.status_code == 400 and inspect.json()["error"]["code"] == "features_unavailable"
