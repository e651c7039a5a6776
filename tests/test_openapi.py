"""/openapi.json describes every steerserve route, on the shared server: each route's request
(body properties, query and path parameters), its answers in OpenAI's error shape (400, never
FastAPI's 422), and response schemas that the server's real answers conform to; the `steering`
and `trace` fields steerserve adds to the completion routes are described there too.
"""

from __future__ import annotations

import base64
import time

import jsonschema
import numpy as np
import pytest

INSPECT_FIELDS = {"model", "messages", "prompt", "add_generation_prompt", "layers", "top_k", "steering", "quality",
                  "splice", "watch", "next_token_logprobs"}
ROUTES = {  # (method, path): (JSON or form body properties, query parameters, path parameters)
    ("GET", "/v1/saes"): (None, set(), set()),
    ("POST", "/v1/features/inspect"): (INSPECT_FIELDS, set(), set()),
    ("POST", "/v1/features/contrast"): ({"model", "positive", "negative", "layers", "top_k", "add_generation_prompt",
                                        "save_as"}, set(), set()),
    ("POST", "/v1/features/dashboards"): ({"layers", "documents", "top_n", "before", "after", "bins", "low", "high"},
                                          set(), set()),
    ("GET", "/v1/features/search"): (None, {"q", "token", "layer", "limit", "offset"}, set()),
    ("GET", "/v1/features/{layer}/{index}"): (None, set(), {"layer", "index"}),
    ("POST", "/v1/files"): ({"file", "purpose"}, set(), set()),
    ("GET", "/v1/files"): (None, {"purpose", "after", "order", "limit"}, set()),
    ("GET", "/v1/files/{file_id}"): (None, set(), {"file_id"}),
    ("GET", "/v1/files/{file_id}/content"): (None, set(), {"file_id"}),
    ("DELETE", "/v1/files/{file_id}"): (None, set(), {"file_id"}),
    ("POST", "/v1/batches"): ({"input_file_id", "endpoint", "completion_window", "metadata"}, set(), set()),
    ("GET", "/v1/batches"): (None, {"after", "limit"}, set()),
    ("GET", "/v1/batches/{batch_id}"): (None, set(), {"batch_id"}),
    ("POST", "/v1/batches/{batch_id}/cancel"): (None, set(), {"batch_id"}),
    ("POST", "/v1/steering/presets"): ({"name", "steering", "description"}, set(), set()),
    ("GET", "/v1/steering/presets"): (None, set(), set()),
    ("GET", "/v1/steering/presets/{name}"): (None, set(), {"name"}),
    ("DELETE", "/v1/steering/presets/{name}"): (None, set(), {"name"}),
    ("POST", "/v1/steering/vectors"): ({"name", "vector", "layer", "description"}, set(), set()),
    ("GET", "/v1/steering/vectors"): (None, set(), set()),
    ("GET", "/v1/steering/vectors/{name}"): (None, set(), {"name"}),
    ("DELETE", "/v1/steering/vectors/{name}"): (None, set(), {"name"}),
}
# The others take JSON; the first type's fields are ROUTES' body.
BODY_TYPES = {"/v1/files": ("multipart/form-data",), "/v1/steering/vectors": ("application/json", "multipart/form-data")}


@pytest.fixture(scope="module")
def document(http) -> dict:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(document: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def conforms(document: dict, method: str, path: str, answer: dict) -> None:
    """`answer` is valid against the 200 response schema documented for the route."""
    schema = document["paths"][path][method.lower()]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": document["components"]}).validate(answer)


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_is_described_with_its_request(document, method, path):
    body, query, path_params = ROUTES[method, path]
    operation = document["paths"][path][method.lower()]
    parameters = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
    assert parameters == {("query", q) for q in query} | {("path", p) for p in path_params}
    if body is None:
        assert "requestBody" not in operation
    else:
        content = operation["requestBody"]["content"]
        types = BODY_TYPES.get(path, ("application/json",))
        assert list(content) == list(types)
        assert set(resolve(document, content[types[0]]["schema"])["properties"]) == body
    responses = operation["responses"]
    assert "422" not in responses  # a refused request is a 400
    for status in ("4XX", "5XX"):
        error = resolve(document, responses[status]["content"]["application/json"]["schema"])
        assert set(resolve(document, error["properties"]["error"])["properties"]) == {"message", "type", "param",
                                                                                    "code"}
    assert "200" in responses


def test_documented_bounds_and_choices(document):
    inspect = resolve(document, {"$ref": "#/components/schemas/InspectRequest"})["properties"]
    assert (inspect["top_k"]["minimum"], inspect["top_k"]["maximum"]) == (1, 100)
    assert inspect["steering"]["anyOf"][0] == {"$ref": "#/components/schemas/Steering"}
    upload = document["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    purpose = resolve(document, upload)["properties"]["purpose"]
    assert purpose["enum"] == ["batch", "user_data", "assistants", "fine-tune", "vision", "evals"]
    vector_upload = document["paths"]["/v1/steering/vectors"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(vector_upload["schema"]["properties"]) == {"file", "name", "layer", "tensor", "description"}
    assert vector_upload["schema"]["properties"]["file"]["format"] == "binary"
    search = {p["name"]: p for p in document["paths"]["/v1/features/search"]["get"]["parameters"]}
    assert search["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "title": "Limit"}
    assert search["limit"]["description"] == "default: 20"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_completion_bodies_carry_steering_and_trace(document, path):
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    vllm_model, added = schema["allOf"]
    assert "messages" in resolve(document, vllm_model)["properties"] or "prompt" in resolve(document, vllm_model)[
        "properties"]
    assert set(added["properties"]) == {"steering", "trace"}
    steering = resolve(document, added["properties"]["steering"]["anyOf"][0])
    assert set(steering["properties"]) == {"features", "vectors", "apply_to", "compare"}
    feature = resolve(document, steering["properties"]["features"]["items"])
    assert set(feature["properties"]) == {"layer", "index", "mode", "value", "when"}
    assert feature["properties"]["mode"]["enum"] == ["add", "clamp", "scale", "ablate"]
    trace = resolve(document, added["properties"]["trace"]["anyOf"][0])
    assert set(trace["properties"]) == {"layers", "top_k", "positions", "residuals"}


@pytest.mark.parametrize("method,path,body,param,code", [
    ("POST", "/v1/features/inspect", {"prompt": "the weather", "layers": [1, "2"]}, "layers[1]", "invalid_request"),
    ("POST", "/v1/features/inspect", {"prompt": "the weather", "splice": "yes"}, "splice", "invalid_request"),
    ("POST", "/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                             "completion_window": "24h", "metadata": {"k": 5}}, "metadata.k", "invalid_value"),
    ("POST", "/v1/batches", {"endpoint": "/v1/chat/completions", "completion_window": "24h"}, "input_file_id",
     "missing_required_parameter"),
    ("GET", "/v1/features/one/3", None, "layer", "invalid_request"),
])
def test_what_a_model_refuses_is_an_openai_error_naming_the_field(http, method, path, body, param, code):
    response = http.request(method, path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"].startswith("invalid request: ")


def test_answers_conform_to_the_documented_responses(http, document):
    conforms(document, "GET", "/v1/saes", http.get("/v1/saes").json())
    conforms(document, "GET", "/v1/features/{layer}/{index}", http.get("/v1/features/2/9").json())
    for params in ({"q": "weather"}, {"token": " the", "limit": 3}):
        conforms(document, "GET", "/v1/features/search", http.get("/v1/features/search", params=params).json())
    inspected = http.post("/v1/features/inspect", json={"prompt": "the weather", "layers": [1], "top_k": 2,
                                                          "watch": [3], "quality": True, "next_token_logprobs": 2})
    assert inspected.status_code == 200, inspected.text
    assert {"nll", "next_token_logprobs", "quality"} <= set(inspected.json())
    conforms(document, "POST", "/v1/features/inspect", inspected.json())
    plain = http.post("/v1/features/inspect", json={"prompt": "the weather", "layers": [1], "top_k": 2}).json()
    assert not {"nll", "next_token_logprobs", "quality"} & set(plain)  # absent, not null
    assert "watched" not in plain["tokens"][0]


def test_files_and_batches_answers_conform(http, document):
    """A batch whose only line is not JSON fails validation without running on the engine."""
    uploaded = http.post("/v1/files", files={"file": ("in.jsonl", b"not json\n")}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    conforms(document, "POST", "/v1/files", uploaded.json())
    file_id = uploaded.json()["id"]
    conforms(document, "GET", "/v1/files/{file_id}", http.get(f"/v1/files/{file_id}").json())
    conforms(document, "GET", "/v1/files", http.get("/v1/files", params={"limit": 2}).json())
    created = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h", "metadata": {"test": "openapi"}})
    assert created.status_code == 200, created.text
    conforms(document, "POST", "/v1/batches", created.json())
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] != "failed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch["errors"]["data"]  # validated with its errors object
    conforms(document, "GET", "/v1/batches/{batch_id}", batch)
    conforms(document, "GET", "/v1/batches", http.get("/v1/batches", params={"limit": 3}).json())
    conforms(document, "DELETE", "/v1/files/{file_id}", http.delete(f"/v1/files/{file_id}").json())


def test_stored_vector_answers_conform(http, document):
    d_model = http.get("/v1/saes").json()["data"][0]["d_model"]
    vector = base64.b64encode(np.ones(d_model, dtype="<f4").tobytes()).decode()
    created = http.post("/v1/steering/vectors", json={"name": "openapi-v", "vector": vector, "layer": 1})
    assert created.status_code == 200, created.text
    conforms(document, "POST", "/v1/steering/vectors", created.json())
    conforms(document, "GET", "/v1/steering/vectors", http.get("/v1/steering/vectors").json())
    conforms(document, "GET", "/v1/steering/vectors/{name}", http.get("/v1/steering/vectors/openapi-v").json())
    conforms(document, "DELETE", "/v1/steering/vectors/{name}", http.delete("/v1/steering/vectors/openapi-v").json())
