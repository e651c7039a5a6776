"""Schema-driven fuzzing of every steerserve route and the completion routes (issue 10).

Hypothesis builds request bodies from each route's fields, with well-typed, wrongly typed and
hostile values (reserved `vllm_xargs` keys, forged specs, huge numbers, deep and odd JSON), and
sends them to the shared server. Every answer must be below 500 in the OpenAI error shape, and
the engine must outlive the run. Derandomized and bounded, so CI sees the same cases each time.
The request's shape is fuzzed too (issue 21): every method, with and without the key, no, one
or several Content-Type headers of any kind, JSON, deep or raw bodies.

A 4xx in the right shape is not enough on steerserve's own routes: vLLM's exception handler
answers a ValueError, TypeError or OverflowError that escaped a route with a 400 in the same
four keys (type "BadRequestError", the status as an integer `code`), so an unhandled exception
would pass as handled (issue 28). There every error must be steerserve's: a string `code`.
Hostile numbers, files and sizes (issue 28) are sent one by one, each with a client timeout, and
each must get steerserve's 4xx naming the field at fault, with the server alive after.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import hostile_files
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


STEERSERVE_ROUTES = ("/v1/features", "/v1/steering", "/v1/saes", "/v1/batches", "/v1/files")
HOSTILE_TIMEOUT = 30  # seconds: a hostile request that hangs the server fails instead of stalling the suite


def check(response, anthropic: bool = False) -> dict | None:
    """Below 500; errors in the OpenAI shape (vLLM's Anthropic route answers its own errors in
    Anthropic's shape, which its clients expect; steerserve's refusals there are OpenAI's), and
    on steerserve's routes steerserve's own (see the module docstring). Returns the error."""
    assert response.status_code < 500, response.text[:2000]
    if response.status_code < 400:
        return None
    error = response.json()["error"]
    if anthropic and set(error) == {"type", "message"}:
        return error
    assert {"message", "type", "param", "code"} <= set(error), error
    if response.request.url.path.startswith(STEERSERVE_ROUTES):
        assert isinstance(error["code"], str) and error["type"] != "BadRequestError", (
            f"an exception escaped to vLLM's handler: {error}")
    return error


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


def memory_kib(pid: int, field: str) -> int:
    """A `/proc/PID/status` memory field (VmRSS, VmHWM: the peak since the last reset)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def refused(server, http, param: str, method: str, path: str, max_peak_bytes: int | None = None,
            **request) -> None:
    """The request gets steerserve's 4xx naming `param` (or a JSON path under it) within
    HOSTILE_TIMEOUT, the API process's peak memory grows by at most `max_peak_bytes` over what
    it held before (the peak is reset first: `5` to /proc/PID/clear_refs), and the server
    still answers after it."""
    api = server.proc.pid  # with one API process, vLLM serves it in the process it was started as
    Path(f"/proc/{api}/clear_refs").write_text("5")
    before = memory_kib(api, "VmRSS")
    try:
        response = http.request(method, path, timeout=HOSTILE_TIMEOUT, **request)
    except httpx.TimeoutException:
        pytest.fail(f"{method} {path}: no answer in {HOSTILE_TIMEOUT} s")
    peak = (memory_kib(api, "VmHWM") - before) * 1024
    assert max_peak_bytes is None or peak <= max_peak_bytes, f"the API's peak memory grew by {peak >> 20} MiB"
    error = check(response)
    assert error is not None, f"accepted: {response.text[:500]}"
    assert error["param"] is not None and error["param"].startswith((f"{param}.", f"{param}[")) or (
        error["param"] == param), error
    assert server.proc.poll() is None and http.get("/health", timeout=HOSTILE_TIMEOUT).status_code == 200


def vector_upload(file: bytes, **form: str) -> dict:
    return {"files": {"file": ("v.bin", file)}, "data": {"name": "hostile", **form}}


@pytest.mark.parametrize(("case", "param"), [
    ("gguf_array_bomb", "file"),  # 104 bytes claiming 2^40 array items
    ("deflated_pt", "file"),  # 256 KiB inflating to 256 MiB
    ("zero_stride_pt", "file"),  # 1.5 KB, 1 GiB once copied
    ("meta_pt", "file"), ("sparse_pt", "file"), ("quantized_pt", "file"),
    ("direction_0_and_00", "file"),  # two tensors for layer 0
    ("overflowing_norm_npy", "file"), ("overflowing_norm_base64", "vector"),
    ("layer --5", "layer"), ("layer ²", "layer"), ("layer of 5000 digits", "layer"),
])
def test_hostile_vector_uploads_are_refused(server, http, d_model, case, param):
    """Each file is checked against its own size, layout, dtype and d_model before anything is
    materialised, so the API's peak memory grows by at most 64 MiB + 16x the upload; norms must
    be finite in float32; `layer` is a number of ASCII digits."""
    builders = {
        "gguf_array_bomb": lambda: vector_upload(hostile_files.gguf_array_bomb()),
        "zero_stride_pt": lambda: vector_upload(hostile_files.zero_stride_pt()),
        "deflated_pt": lambda: vector_upload(hostile_files.deflated_pt()),
        "meta_pt": lambda: vector_upload(hostile_files.meta_pt(d_model)),
        "sparse_pt": lambda: vector_upload(hostile_files.sparse_pt(d_model)),
        "quantized_pt": lambda: vector_upload(hostile_files.quantized_pt(d_model)),
        "direction_0_and_00": lambda: vector_upload(hostile_files.control_vector_gguf(
            {"direction.0": [1.0] * d_model, "direction.00": [2.0] * d_model})),
        "overflowing_norm_npy": lambda: vector_upload(hostile_files.npy_file(hostile_files.overflowing_norm(d_model))),
        "overflowing_norm_base64": lambda: {"json": {"name": "hostile", "layer": 1, "vector": base64.b64encode(
            hostile_files.overflowing_norm(d_model).astype("<f4").tobytes()).decode()}},
        "layer --5": lambda: vector_upload(hostile_files.npy_file([0.5] * d_model), layer="--5"),
        "layer ²": lambda: vector_upload(hostile_files.npy_file([0.5] * d_model), layer="²"),
        "layer of 5000 digits": lambda: vector_upload(hostile_files.npy_file([0.5] * d_model), layer="7" * 5000),
    }
    request = builders[case]()
    size = len(request["files"]["file"][1]) if "files" in request else len(json.dumps(request["json"]))
    try:
        refused(server, http, param, "POST", "/v1/steering/vectors", max_peak_bytes=64 * 2**20 + 16 * size, **request)
    finally:
        http.delete("/v1/steering/vectors/hostile", timeout=HOSTILE_TIMEOUT)


@pytest.mark.parametrize(("body", "param"), [
    ({"name": "hostile", "steering": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 1.0}]},
      "description": "d" * (15 * 2**20)}, "description"),
    ({"name": "hostile", "steering": {"features": [{"layer": 1, "index": i % 1024, "mode": "add", "value": 1.0}
                                                   for i in range(200_000)]}}, "steering"),
], ids=["15 MiB description", "200,000 features"])
def test_oversized_presets_are_refused(server, http, body, param):
    """/v1/models lists every preset, and every client calls it: presets have size limits."""
    try:
        refused(server, http, param, "POST", "/v1/steering/presets", json=body)
    finally:
        http.delete("/v1/steering/presets/hostile", timeout=HOSTILE_TIMEOUT)


@pytest.mark.parametrize(("numbers", "param"), [
    ('"high": 1e999', "high"), ('"low": 1e-999', "low"), ('"low": -1', "low"), ('"low": 0', "low"),
    ('"bins": 0', "bins"), ('"bins": 1000000000', "bins"), ('"bins": 18446744073709551616', "bins"),
    ('"low": 1e10, "high": 10000000000.000002', "high"),  # log10(high) == log10(low): no bin has a width
])
def test_dashboard_numbers_the_workers_cannot_take_are_refused(server, http, numbers, param):
    """Every histogram number is checked at the API: a bin width of 0 took the engine down."""
    body = '{"layers": [1], "documents": [{"id": 0, "prompt": "the weather"}], ' + numbers + "}"
    refused(server, http, param, "POST", "/v1/features/dashboards", content=body.encode(),
            headers={"content-type": "application/json"})


def test_engine_survived_the_fuzzing(server, http):
    assert server.proc.poll() is None
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "the weather", "max_tokens": 2})
    assert response.status_code == 200
