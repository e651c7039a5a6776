"""Schema-driven fuzzing of every steerserve route and the completion routes (issue 10).

Hypothesis builds request bodies from each route's fields, with well-typed, wrongly typed and
hostile values (reserved `vllm_xargs` keys, forged specs, huge numbers, deep and odd JSON), and
sends them to the shared server. Every answer must be below 500 in the OpenAI error shape, and
the engine must outlive the run. Derandomized and bounded, so CI sees the same cases each time.
The request's shape is fuzzed too (issue 21): every method, with and without the key, no, one
or several Content-Type headers of any kind, JSON, deep or raw bodies.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AUTH, MODEL_NAME

EXAMPLES = 60  # per test: ~400 requests in all, about a minute on the CPU default
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["NaN", "Infinity", "-1", "1e400", "", "\u0000", "steer-0"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
small_ints = st.one_of(st.integers(min_value=-3, max_value=1100), st.sampled_from([2**31, 2**63, 10**30]))

feature = st.fixed_dictionaries(
    {"layer": st.one_of(st.sampled_from([1, 2]), small_ints, scalars),
     "index": st.one_of(st.integers(min_value=0, max_value=1023), small_ints, scalars)},
    optional={"mode": st.one_of(st.sampled_from(["add", "clamp", "scale", "ablate"]), scalars),
              "value": st.one_of(st.floats(min_value=-20, max_value=20), scalars),
              "strength": scalars})
vector_entry = st.fixed_dictionaries(  # a stored vector's name, an inline base64 one, or garbage
    {"layer": st.one_of(st.sampled_from([1, 2]), small_ints, scalars),
     "vector": st.one_of(st.sampled_from(["fuzz-v", "fuzz-ctrl", "nope", "AAAAAA=="]), scalars)},
    optional={"mode": st.one_of(st.sampled_from(["add", "cap", "ablate"]), scalars),
              "value": st.one_of(st.floats(min_value=-20, max_value=20), scalars)})
steering = st.one_of(
    st.fixed_dictionaries({"features": st.lists(feature, max_size=3)},
                          optional={"vectors": st.lists(vector_entry, max_size=2),
                                    "apply_to": st.one_of(st.sampled_from(["all", "prompt", "generation"]), scalars),
                                    "compare": st.one_of(st.booleans(), scalars)}),
    json_values)
forged = st.one_of(scalars, st.just("{}"), st.just('{"features": [], "apply_to": "all"}'),
                   st.builds(lambda mac, body: f"{mac}.{body}", st.text("0123456789abcdef", min_size=64, max_size=64),
                             st.sampled_from(["{}", '{"id": "x", "layers": [1], "top_k": 99999}'])))
xargs = st.one_of(
    st.dictionaries(st.sampled_from(["steerserve_steering", "steerserve_capture", "steerserve_other", "session_id", "x"]),
                    forged, max_size=3),
    json_values)
common = {  # optional fields of both completion routes, hostile values included
    "steering": steering, "vllm_xargs": xargs, "cache_salt": scalars, "temperature": scalars, "seed": small_ints,
    "stream": st.booleans(), "n": st.one_of(st.integers(min_value=-1, max_value=3), scalars),
    "logprobs": st.one_of(st.booleans(), small_ints), "stop": json_values, "priority": small_ints,
    "max_tokens": st.one_of(st.integers(min_value=-1, max_value=4), st.sampled_from([10**9, 2**64]), scalars),
}
messages = st.one_of(st.just([{"role": "user", "content": "Tell me about the weather."}]), json_values,
                     st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system"]), scalars),
                                                     "content": st.one_of(st.text(max_size=40), scalars)}), max_size=2))
prompt = st.one_of(st.text(max_size=40), st.just("hi"), st.lists(st.integers(min_value=-5, max_value=2000), max_size=8),
                   json_values)
chat_body = st.fixed_dictionaries({"model": st.just(MODEL_NAME), "messages": messages}, optional=common)
completion_body = st.fixed_dictionaries({"model": st.just(MODEL_NAME), "prompt": prompt}, optional=common)
inspect_body = st.fixed_dictionaries({}, optional={
    "prompt": prompt, "messages": messages, "layers": st.one_of(st.lists(small_ints, max_size=3), json_values),
    "top_k": st.one_of(small_ints, scalars), "steering": steering, "add_generation_prompt": scalars,
    "model": scalars, "extra": scalars, "watch": st.one_of(st.lists(small_ints, max_size=3), json_values),
    "quality": scalars, "splice": scalars})
batch_body = st.fixed_dictionaries({}, optional={
    "input_file_id": st.one_of(st.text(max_size=30), scalars), "endpoint": st.one_of(
        st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), scalars),
    "completion_window": st.one_of(st.sampled_from(["24h", "1h", "169h", "0h", "9" * 50 + "h"]), scalars),
    "metadata": json_values})


def bounded(body: dict) -> dict:
    """Valid requests must stay cheap: no long generations, no large n."""
    body.setdefault("max_tokens", 3)
    if "input" in body:  # /v1/responses
        body.setdefault("max_output_tokens", 3)
    if isinstance(body.get("max_tokens"), int) and 4 < body["max_tokens"] < 10**6:
        body["max_tokens"] = 4
    if isinstance(body.get("n"), int) and body["n"] > 3:
        body["n"] = 3
    return body


def check(response, anthropic: bool = False) -> None:
    """Below 500; errors in the OpenAI shape (vLLM's Anthropic route answers its own errors in
    Anthropic's shape, which its clients expect; steerserve's refusals there are OpenAI's)."""
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        error = response.json()["error"]
        if anthropic and set(error) == {"type", "message"}:
            return
        assert {"message", "type", "param", "code"} <= set(error), error


def send(http, path: str, body) -> None:
    data = json.dumps(body).encode()
    with http.stream("POST", path, content=data, headers={"content-type": "application/json"}) as response:
        response.read()
        check(response, anthropic=path == "/v1/messages")


@pytest.fixture(scope="module")
def d_model(http) -> int:
    return http.get("/v1/saes").json()["data"][0]["d_model"]


@pytest.fixture(scope="module", autouse=True)
def stored_vectors(http, d_model):
    """Two stored vectors, so that the fuzzed `steering.vectors` also name real ones."""
    zero = base64.b64encode(bytes(4 * d_model)).decode()
    for name, layer in (("fuzz-v", None), ("fuzz-ctrl", 1)):
        http.post("/v1/steering/vectors", json={"name": name, "vector": zero, "layer": layer})
    yield
    for name in ("fuzz-v", "fuzz-ctrl"):
        http.delete(f"/v1/steering/vectors/{name}")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/invocations"])
def test_fuzz_chat(http, path):
    given(chat_body)(FUZZ(lambda body: send(http, path, bounded(body))))()


@pytest.mark.parametrize("path", ["/v1/completions", "/invocations"])
def test_fuzz_completions(http, path):
    given(completion_body)(FUZZ(lambda body: send(http, path, bounded(body))))()


def test_fuzz_other_generating_routes(http):
    routes = st.sampled_from(["/v1/responses", "/v1/messages", "/v1/chat/completions/batch"])
    body = st.fixed_dictionaries({"model": st.just(MODEL_NAME), "input": prompt, "messages": messages},
                                 optional=common)
    given(routes, body)(FUZZ(lambda path, b: send(http, path, bounded(b))))()


@pytest.mark.parametrize("path, text", [("/v1/responses", "input"), ("/v1/messages", "messages")])
def test_fuzz_steering_on_responses_and_messages(http, path, text):
    """Bodies each route accepts, with `steering` (applied there) and `trace` (refused there)."""
    trace = st.one_of(st.fixed_dictionaries({"layers": st.lists(small_ints, max_size=2)}), json_values)
    body = st.fixed_dictionaries({"model": st.just(MODEL_NAME), text: st.one_of(messages, prompt)},
                                 optional={**common, "trace": trace})
    given(body)(settings(FUZZ, max_examples=EXAMPLES // 2)(lambda b: send(http, path, bounded(b))))()


def test_fuzz_inspect(http):
    given(inspect_body)(FUZZ(lambda body: send(http, "/v1/features/inspect", body)))()


def test_fuzz_contrast(http):
    examples = st.one_of(st.lists(st.one_of(st.text(max_size=20), messages), max_size=3), json_values)
    body = st.fixed_dictionaries({}, optional={
        "positive": examples, "negative": examples, "layers": st.one_of(st.lists(small_ints, max_size=3), json_values),
        "top_k": st.one_of(small_ints, scalars), "save_as": st.one_of(st.sampled_from(["fuzz-c", "no spaces"]), scalars),
        "add_generation_prompt": scalars, "model": scalars, "extra": scalars})

    def run(b):
        send(http, "/v1/features/contrast", b)
        http.delete("/v1/steering/vectors/fuzz-c")

    given(body)(FUZZ(run))()


def test_fuzz_dashboard_batches(http):
    """`steerserve dashboards`' per-batch route: documents, layers and the accumulator settings."""
    document = st.one_of(st.fixed_dictionaries({"id": st.one_of(small_ints, scalars)},
                                               optional={"prompt": st.one_of(st.text(max_size=20), scalars),
                                                         "messages": st.one_of(messages, json_values),
                                                         "group": st.one_of(st.text(max_size=8), scalars),
                                                         "extra": scalars}), json_values)
    numbers = st.one_of(small_ints, scalars)
    body = st.fixed_dictionaries({}, optional={
        "layers": st.one_of(st.lists(small_ints, max_size=3), json_values), "documents": st.one_of(
            st.lists(document, max_size=3), json_values), "top_n": numbers, "before": numbers, "after": numbers,
        "bins": numbers, "low": numbers, "high": numbers, "extra": scalars})
    given(body)(settings(FUZZ, max_examples=EXAMPLES // 2)(lambda b: send(http, "/v1/features/dashboards", b)))()


def test_fuzz_batches_and_files(http):
    def run(body, file_bytes, name, purpose, object_id):
        send(http, "/v1/batches", body)
        check(http.post("/v1/files", files={"file": (name, file_bytes)}, data={"purpose": purpose}))
        for path in (f"/v1/files/{object_id}", f"/v1/files/{object_id}/content", f"/v1/batches/{object_id}"):
            check(http.get(path))
        check(http.post(f"/v1/batches/{object_id}/cancel"))
        check(http.delete(f"/v1/files/{object_id}"))

    ids = st.one_of(st.text(min_size=1, max_size=30).map(lambda t: quote(t, safe="")),
                    st.sampled_from(["file-" + "0" * 24, "batch_x", "%2e%2e"]))
    given(batch_body, st.binary(max_size=300), st.text(max_size=20), st.one_of(st.sampled_from(["batch"]), st.text(max_size=8)),
          ids)(FUZZ(run))()


def test_fuzz_stored_vectors(http, d_model):
    """Creating, reading and deleting stored vectors."""
    vector_body = st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.sampled_from(["fuzz-x", "fuzz-v", "a" * 65, "bad name"]), scalars),
        "vector": st.one_of(st.just(base64.b64encode(bytes(4 * d_model)).decode()), st.sampled_from(["", "AAAA"]),
                            scalars),
        "layer": st.one_of(small_ints, scalars), "description": st.one_of(st.text(max_size=20), scalars),
        "extra": scalars})
    form_values = st.dictionaries(st.sampled_from(["name", "layer", "tensor", "description", "x"]),
                                  st.text(max_size=12), max_size=4)
    names = st.one_of(st.text(min_size=1, max_size=30).map(lambda t: quote(t, safe="")),
                      st.sampled_from(["fuzz-x", "%2e%2e", "a" * 70]))

    def run(body, file_bytes, form, name):
        send(http, "/v1/steering/vectors", body)
        check(http.post("/v1/steering/vectors", files={"file": ("v.npy", file_bytes)}, data=form))
        check(http.get("/v1/steering/vectors"))
        check(http.get(f"/v1/steering/vectors/{name}"))
        check(http.delete(f"/v1/steering/vectors/{name}"))

    given(vector_body, st.one_of(st.binary(max_size=300), st.sampled_from([b"GGUF" + bytes(40), b"\x93NUMPY" + bytes(20),
                                                                           b"PK\x03\x04" + bytes(20)])),
          form_values, names)(FUZZ(run))()


def test_fuzz_feature_lookups(http):
    query_value = st.one_of(st.text(max_size=10), st.integers(min_value=-(10**40), max_value=10**40).map(str))

    def run(params, layer, index):
        check(http.get("/v1/features/search", params=params))
        check(http.get(f"/v1/features/{quote(layer, safe='')}/{quote(index, safe='')}"))

    params = st.dictionaries(st.sampled_from(["q", "token", "layer", "limit", "offset", "x"]), query_value, max_size=4)
    given(params, query_value, query_value)(FUZZ(run))()


def test_fuzz_methods_headers_and_bodies(server):
    """The key is checked first, then the content type (one, JSON on a JSON route), then the body."""
    methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/invocations", "/v1/features/inspect",
                             "/v1/batches", "/v1/files", "/v1/steering/vectors", "/tokenize", "/metrics", "/v1/models", "/health"])
    content_types = st.lists(st.sampled_from([
        "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "multipart/form-data; boundary=x",
        "text/plain", "application/x-www-form-urlencoded", "application/jsonl", ""]), max_size=3)
    bodies = st.one_of(completion_body.map(lambda b: json.dumps(bounded(b)).encode()),
                       inspect_body.map(lambda b: json.dumps(b).encode()), st.binary(max_size=200),
                       st.integers(min_value=1, max_value=100_000).map(lambda d: b"[" * d + b"]" * d))

    def run(method, path, types, body, keyed):
        headers = [*(AUTH.items() if keyed else ()), *(("content-type", t) for t in types)]
        response = httpx.request(method, server.base_url + path, headers=headers,
                                 content=body if method not in ("GET", "HEAD") else None, timeout=300)
        assert response.status_code < 500, response.text[:2000]
        if path != "/health" and not keyed:
            assert response.status_code == 401
        elif len(types) > 1:
            assert response.status_code == 400
            assert method == "HEAD" or response.json()["error"]["code"] == "ambiguous_content_type"
        elif method in ("POST", "PUT", "PATCH") and path != "/v1/files" and body.strip() and not (
                path == "/v1/steering/vectors" and types and types[0].lower().startswith("multipart/form-data")) and (
                not types or types[0].split(";")[0].strip().lower() != "application/json"):
            assert response.status_code == 415
        if response.status_code >= 400 and method != "HEAD":
            assert {"message", "type", "param", "code"} <= set(response.json()["error"]), response.text[:2000]

    given(methods, paths, content_types, bodies, st.booleans())(FUZZ(run))()


def test_fuzz_presets(http):
    """Preset bodies and names; one valid preset is then used as a model with fuzzed fields
    (inline steering merged into it included), and every preset created is deleted again."""
    names = st.one_of(st.sampled_from(["fuzz-preset", MODEL_NAME, "", "a" * 65, "a/b", "%2e%2e"]), st.text(max_size=12),
                      scalars)
    preset_body = st.fixed_dictionaries({}, optional={"name": names, "steering": steering,
                                                      "description": st.one_of(st.text(max_size=20), scalars),
                                                      "extra": scalars})
    model_body = st.fixed_dictionaries({"model": st.just("fuzz-preset"), "messages": messages}, optional=common)
    assert http.post("/v1/steering/presets", json={"name": "fuzz-preset", "steering": {"features": [
        {"layer": 1, "index": 3, "mode": "add", "value": 2.0}]}}).status_code == 200

    def run(body, name, chat):
        response = http.post("/v1/steering/presets", json=body)
        check(response)
        if response.status_code == 200:
            assert http.delete(f"/v1/steering/presets/{quote(response.json()['name'], safe='')}").status_code == 200
        path_name = quote(name if isinstance(name, str) else json.dumps(name), safe="")
        check(http.get(f"/v1/steering/presets/{path_name}"))
        send(http, "/v1/chat/completions", bounded(chat))

    try:
        given(preset_body, names, model_body)(FUZZ(run))()
    finally:
        http.delete("/v1/steering/presets/fuzz-preset")


def test_engine_survived_the_fuzzing(server, http):
    assert server.proc.poll() is None
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "the weather", "max_tokens": 2})
    assert response.status_code == 200
