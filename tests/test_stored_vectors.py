"""Stored direction vectors (`/v1/steering/vectors`): files read without running their contents,
a GGUF control vector in the layout repeng and llama.cpp write, durability across a reopen, and
over HTTP on the shared server: a stored vector steers exactly like the same vector inline.
"""

from __future__ import annotations

import base64
import io
import pickle

import gguf
import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors

from steerserve.errors import APIError
from steerserve.steering.vector_files import read_vector_file
from steerserve.steering.vector_store import VectorStore, new_vector, resolve_names
from tests.conftest import MODEL_NAME
from tests.test_differential import server_greedy

D = 8


def b64(v) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def gguf_bytes(tmp_path, directions: dict[int, np.ndarray], arch: str = "controlvector") -> bytes:
    """A control vector as repeng's export_gguf writes it: arch `controlvector`, model hint and
    layer count, one F32 `direction.{layer}` per layer."""
    path = tmp_path / "control.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "qwen3_5")
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, values in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def npy_bytes(values) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(values))
    return out.getvalue()


def pt_bytes(obj) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def test_every_file_format_gives_the_same_vector(tmp_path):
    v = np.arange(D, dtype=np.float32) - 3.5
    assert np.array_equal(read_vector_file(npy_bytes(v), D)[None], v)
    assert np.array_equal(read_vector_file(save_safetensors({"steer": v}), D)[None], v)
    two = save_safetensors({"a": v, "b": 2 * v})
    assert np.array_equal(read_vector_file(two, D, "b")[None], 2 * v)
    assert np.array_equal(read_vector_file(pt_bytes(torch.tensor(v).to(torch.bfloat16)), D)[None], v)  # exact in bf16
    assert np.array_equal(read_vector_file(pt_bytes({"x": torch.tensor(v)}), D)[None], v)
    control = read_vector_file(gguf_bytes(tmp_path, {1: v, 2: -v}), D)
    assert set(control) == {1, 2} and np.array_equal(control[1], v) and np.array_equal(control[2], -v)


class Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("data, tensor, says", [
    (save_safetensors({"a": np.ones(D, np.float32), "b": np.ones(D, np.float32)}), None, "name one with `tensor`"),
    (save_safetensors({"a": np.ones(D, np.float32)}), "c", "no tensor 'c'"),
    (npy_bytes(np.ones((2, D), np.float32)), None, "one-dimensional"),
    (npy_bytes(np.arange(D)), None, "floating-point"),
    (npy_bytes(np.array([Boom()], dtype=object)), None, "floating-point values, not object"),
    (pt_bytes([Boom()]), None, "not a readable pt file"),
    (pickle.dumps(Boom()), None, "unrecognised file"),
    (b"", None, "unrecognised file"),
])
def test_bad_files_are_400s_and_never_unpickled(data, tensor, says, capsys):
    with pytest.raises(APIError) as caught:
        read_vector_file(data, D, tensor)
    assert says in caught.value.message and caught.value.status == 400
    assert "unpickled!" not in capsys.readouterr().out


def test_a_gguf_that_is_not_a_control_vector_is_refused(tmp_path):
    with pytest.raises(APIError, match="must be a control vector"):
        read_vector_file(gguf_bytes(tmp_path, {1: np.ones(D)}, arch="llama"), D)


def test_the_store_survives_a_reopen_and_resolves_names(tmp_path):
    store = VectorStore(tmp_path, D, max_rows=3)
    v = np.linspace(-1, 1, D).astype(np.float32)
    store.put(new_vector("ctrl", {1: v, 2: -v}, "two layers", "gguf", D))
    with pytest.raises(APIError) as taken:
        store.put(new_vector("ctrl", {None: v}, None, "base64", D))
    assert taken.value.status == 409
    with pytest.raises(APIError, match="at most 3"):
        store.put(new_vector("more", {1: v, 2: v}, None, "file", D))
    store.close()
    reopened = VectorStore(tmp_path, D, max_rows=3)
    assert reopened.get("ctrl").description == "two layers"
    steering = {"vectors": [{"layer": 2, "vector": "ctrl", "mode": "add", "value": 1.0}]}
    resolve_names(steering, reopened)
    assert steering["vectors"][0]["vector"] == b64(-v)
    for layer, code in ((3, "vector_layer_missing"), (1, "vector_not_found")):
        with pytest.raises(APIError) as missing:
            resolve_names({"vectors": [{"layer": layer, "vector": "ctrl" if layer == 3 else "nope"}]}, reopened)
        assert missing.value.code == code
    assert reopened.delete("ctrl") and reopened.get("ctrl") is None


@pytest.mark.parametrize("values, code", [(np.ones(D + 1), "invalid_vector"), (np.full(D, np.nan), "invalid_vector")])
def test_a_vector_of_the_wrong_size_or_not_finite_is_refused(values, code):
    with pytest.raises(APIError) as caught:
        new_vector("x", {None: values.astype(np.float32)}, None, "base64", D)
    assert caught.value.code == code


# ---- over HTTP, on the shared tiny-model server ----

def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and (param is None or error["param"] == param), error


@pytest.fixture(scope="module")
def d_model(http) -> int:
    return http.get("/v1/saes").json()["data"][0]["d_model"]


@pytest.fixture(scope="module")
def direction(reference) -> np.ndarray:
    return reference.sae(1).directions[3].float().numpy() * 8.0


def test_a_stored_vector_steers_like_the_same_vector_inline(http, client, direction):
    created = http.post("/v1/steering/vectors", json={"name": "d3x8", "vector": b64(direction),
                                                      "description": "feature 3's row, times 8"})
    assert created.status_code == 200, created.text
    assert created.json()["layers"] == [{"layer": None, "norm": pytest.approx(float(np.linalg.norm(direction)))}]
    inline = server_greedy(client, {"vectors": [{"layer": 1, "vector": b64(direction), "mode": "add", "value": 1.0}]})
    named = server_greedy(client, {"vectors": [{"layer": 1, "vector": "d3x8", "mode": "add", "value": 1.0}]})
    assert named == inline and inline[1] != server_greedy(client, None)[1]
    # the echo names the stored vector beside its digest, on every API's response object
    spec = {"vectors": [{"layer": 1, "vector": "d3x8", "mode": "add", "value": 1.0},
                        {"layer": 2, "vector": b64(direction), "mode": "ablate"}]}
    chat = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2, "steering": spec,
                                                   "messages": [{"role": "user", "content": "hello"}]}).json()
    responses = http.post("/v1/responses", json={"model": MODEL_NAME, "input": "hello", "max_output_tokens": 2,
                                                 "steering": spec}).json()
    for echo in (chat["steering"], responses["steering"]):
        assert [(v["layer"], v.get("name")) for v in echo["vectors"]] == [(1, "d3x8"), (2, None)]
        assert all(v["vector_id"].startswith("vec-") for v in echo["vectors"])
    listed = http.get("/v1/steering/vectors").json()["data"]
    assert [v["name"] for v in listed if v["name"] == "d3x8"] and "vector" not in listed[0]["layers"][0]
    assert http.get("/v1/steering/vectors/d3x8").json()["layers"][0]["vector"] == b64(direction)
    assert http.delete("/v1/steering/vectors/d3x8").json() == {"object": "steering.vector", "name": "d3x8",
                                                                "deleted": True}
    gone = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                                                   "steering": {"vectors": [{"layer": 1, "vector": "d3x8",
                                                                             "mode": "add", "value": 1.0}]}})
    assert_error(gone, 400, "vector_not_found", "steering.vectors[0].vector")


def test_a_gguf_control_vector_steers_each_layer_like_inline(http, client, direction, tmp_path):
    other = np.roll(direction, 5)
    data = gguf_bytes(tmp_path, {1: direction, 2: other})
    created = http.post("/v1/steering/vectors", data={"name": "ctrl:v1"}, files={"file": ("c.gguf", data)})
    assert created.status_code == 200, created.text
    assert [e["layer"] for e in created.json()["layers"]] == [1, 2] and created.json()["source"] == "gguf"
    both = lambda v1, v2: {"vectors": [{"layer": 1, "vector": v1, "mode": "add", "value": 0.5},
                                       {"layer": 2, "vector": v2, "mode": "add", "value": 0.5}]}
    assert server_greedy(client, both("ctrl:v1", "ctrl:v1")) == server_greedy(client, both(b64(direction), b64(other)))
    missing = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "a", "max_tokens": 1, "steering": {
        "vectors": [{"layer": 0, "vector": "ctrl:v1", "mode": "add", "value": 1.0}]}})
    assert_error(missing, 400, "vector_layer_missing", "steering.vectors[0].layer")
    http.delete("/v1/steering/vectors/ctrl:v1")


@pytest.mark.parametrize("kind", ["npy", "safetensors", "pt"])
def test_file_uploads_store_the_vector(http, d_model, kind):
    v = np.linspace(-2, 2, d_model).astype(np.float32)
    data = {"npy": npy_bytes, "safetensors": lambda x: save_safetensors({"v": x}),
            "pt": lambda x: pt_bytes(torch.tensor(x))}[kind](v)
    created = http.post("/v1/steering/vectors", data={"name": f"up-{kind}", "layer": "2"}, files={"file": ("v", data)})
    assert created.status_code == 200, created.text
    assert http.get(f"/v1/steering/vectors/up-{kind}").json()["layers"] == [
        {"layer": 2, "norm": pytest.approx(float(np.linalg.norm(v))), "vector": b64(v)}]
    http.delete(f"/v1/steering/vectors/up-{kind}")


def test_bad_requests_are_openai_errors(http, d_model, server):
    ok = b64(np.ones(d_model))
    assert_error(http.post("/v1/steering/vectors", json={"name": "bad name", "vector": ok}), 400,
                 "invalid_vector_name", "name")
    assert_error(http.post("/v1/steering/vectors", json={"name": "x", "vector": b64(np.ones(d_model + 1))}), 400,
                 "invalid_vector", "vector")
    assert_error(http.post("/v1/steering/vectors", json={"name": "x", "vector": b64(np.full(d_model, np.inf))}), 400,
                 "invalid_vector", "vector")
    assert_error(http.post("/v1/steering/vectors", json={"name": "x", "vector": "%%%"}), 400, "invalid_vector")
    assert_error(http.post("/v1/steering/vectors", json={"name": "x"}), 400, "missing_required_parameter", "vector")
    assert_error(http.post("/v1/steering/vectors", json={"name": "x", "vector": ok, "extra": 1}), 400,
                 "invalid_request", "extra")
    assert_error(http.post("/v1/steering/vectors", data={"name": "x"}, files={"file": ("p", pickle.dumps(Boom()))}),
                 400, "invalid_vector_file", "file")
    assert_error(http.post("/v1/steering/vectors", data={"name": "x", "layer": "one"},
                           files={"file": ("v.npy", npy_bytes(np.ones(d_model, np.float32)))}), 400,
                 "invalid_request", "layer")
    assert http.post("/v1/steering/vectors", json={"name": "dup", "vector": ok}).status_code == 200
    assert_error(http.post("/v1/steering/vectors", json={"name": "dup", "vector": ok}), 409, "vector_exists", "name")
    http.delete("/v1/steering/vectors/dup")
    assert_error(http.get("/v1/steering/vectors/nope"), 404, "vector_not_found")
    assert_error(http.delete("/v1/steering/vectors/nope"), 404, "vector_not_found")
    for method, path in (("GET", "/v1/steering/vectors"), ("POST", "/v1/steering/vectors"),
                         ("DELETE", "/v1/steering/vectors/x")):
        assert_error(httpx.request(method, f"{server.base_url}{path}", json={"name": "x", "vector": ok}), 401,
                     "invalid_api_key")
