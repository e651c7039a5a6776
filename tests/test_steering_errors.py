"""Every invalid steering request is a 400 in the OpenAI error shape, with the JSON path as param."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.conftest import MODEL_NAME, PROMPT


def post(http, steering, path="/v1/chat/completions", **extra):
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 4, "steering": steering, **extra}
    if path == "/v1/completions":
        body.pop("messages")
        body["prompt"] = "hello"
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def feature(**kw):
    return {"layer": 1, "index": 3, "mode": "add", "value": 1.0, **kw}


def vector(n=128, fill=0.5, **kw):
    """A steering vector entry; the shared server's d_model is 128."""
    v = base64.b64encode(np.full(n, fill, dtype="<f4").tobytes()).decode()
    return {"layer": 1, "vector": v, "mode": "cap", "value": 1.0, **kw}


CASES = [
    # (steering, param, code, message fragment)
    ({"features": [feature(layer=3)]}, "steering.features[0].layer", "layer_not_loaded", "no SAE is loaded at layer 3"),
    ({"features": [feature(), feature(index=1024)]}, "steering.features[1].index", "index_out_of_range", "0..1023"),
    ({"features": [feature(index=-1)]}, "steering.features[0].index", "index_out_of_range", "out of range"),
    ({"features": [feature(mode="boost")]}, "steering.features[0].mode", "invalid_steering", "'add', 'clamp', 'scale' or 'ablate'"),
    ({"features": [{"layer": 1, "index": 3, "mode": "clamp"}]}, "steering.features[0].value", "missing_value", "needs a numeric value"),
    ({"features": [feature(value=None)]}, "steering.features[0].value", "missing_value", "needs a numeric value"),
    ({"features": [feature(value="8")]}, "steering.features[0].value", "invalid_steering", "valid number"),
    ({"features": [feature(value=True)]}, "steering.features[0].value", "invalid_steering", "valid number"),
    ({"features": [feature(mode="ablate")]}, "steering.features[0].value", "invalid_value", "takes no value"),
    ({"features": [feature(strength=2)]}, "steering.features[0].strength", "invalid_steering", "unknown key 'strength'"),
    ({"features": [feature()], "aply_to": "all"}, "steering.aply_to", "invalid_steering", "unknown key 'aply_to'"),
    ({"features": [feature()], "apply_to": "decode"}, "steering.apply_to", "invalid_steering", "invalid steering"),
    ({"features": []}, "steering.features", "invalid_steering", "at least 1"),
    ({"features": [feature(layer="1")]}, "steering.features[0].layer", "invalid_steering", "valid integer"),
    ({"features": [feature(), feature()]}, "steering.features[1]", "duplicate_feature", "already appears at steering.features[0]"),
    ("add 8 to feature 3", "steering", "invalid_steering", "invalid steering"),
    ({"features": [feature(index=i) for i in range(65)]}, "steering.features", "too_many_features", "at most 64"),
    ({"vectors": [vector(n=127)]}, "steering.vectors[0].vector", "invalid_vector", "has 127 float32 values"),
    ({"vectors": [vector(vector="not base64!")]}, "steering.vectors[0].vector", "invalid_vector", "not valid base64"),
    ({"vectors": [vector(vector="AAAAAAAAAAA=")]}, "steering.vectors[0].vector", "invalid_vector", "has 2 float32"),
    ({"vectors": [vector(vector="AAA=")]}, "steering.vectors[0].vector", "invalid_vector", "whole number of float32"),
    ({"vectors": [vector(fill=float("nan"))]}, "steering.vectors[0].vector", "invalid_vector", "must be finite"),
    ({"vectors": [vector(fill=0.0)]}, "steering.vectors[0].vector", "invalid_vector", "non-zero vector"),
    ({"vectors": [vector(vector=[0.5] * 128)]}, "steering.vectors[0].vector", "invalid_steering", "valid string"),
    ({"vectors": [vector(mode="clamp")]}, "steering.vectors[0].mode", "invalid_steering", "'add', 'cap' or 'ablate'"),
    ({"vectors": [vector(value=None)]}, "steering.vectors[0].value", "missing_value", "needs a numeric value"),
    ({"vectors": [vector(mode="ablate")]}, "steering.vectors[0].value", "invalid_value", "takes no value"),
    ({"vectors": [vector(value=1e9)]}, "steering.vectors[0].value", "value_out_of_range", "at most"),
    ({"vectors": [vector(), vector(layer=3)]}, "steering.vectors[1].layer", "layer_not_loaded",
     "no direction vector can steer layer 3: it has no SAE and is not one of --steering-layers; vectors may steer "
     "layers [1, 2]"),
    ({"vectors": [vector(layer=1, when={"layer": 2, "index": 5, "above": 0.0})]}, "steering.vectors[0].when.layer",
     "invalid_gate", "at or before its edit's"),
    ({"vectors": [vector(norm=2)]}, "steering.vectors[0].norm", "invalid_steering", "unknown key 'norm'"),
    ({"vectors": [vector() for _ in range(9)]}, "steering.vectors", "too_many_vectors", "at most 8"),
    ({"vectors": []}, "steering.features", "invalid_steering", "at least 1"),
]


@pytest.mark.parametrize("steering,param,code,fragment", CASES, ids=[c[2] + ":" + c[1] for c in CASES])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_invalid_steering_is_400_with_json_path(http, steering, param, code, fragment, path):
    response = post(http, steering, path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert fragment in error["message"]


@pytest.mark.parametrize("raw_value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_value_is_rejected(http, raw_value):
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
            '"steering": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": %s}]}}') % (MODEL_NAME, raw_value)
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "steering.features[0].value"
    assert response.json()["error"]["code"] == "invalid_value"


def test_reserved_worker_key_cannot_bypass_validation(http):
    response = post(http, None, vllm_xargs={"steerserve_steering": '{"features": [], "apply_to": "all"}'})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "vllm_xargs.steerserve_steering"


def test_errors_do_not_take_the_server_down(http):
    for _ in range(3):
        assert post(http, {"features": [feature(layer=99)]}).status_code == 400
    assert http.get("/health").status_code == 200
    ok = post(http, {"features": [feature()]})
    assert ok.status_code == 200 and ok.json()["steering"]["features"][0]["index"] == 3


def test_malformed_json_still_gets_vllms_own_error(http):
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code in (400, 422)
    assert "error" in response.json()
