"""Shared fixtures: one tiny model build and ONE steerserve server per test session.

The server is the real product: `steerserve serve` in a subprocess (vLLM with torch.compile on,
the default), reached over HTTP. Starting vLLM costs about a minute on CPU, so every HTTP test
shares it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from steerserve_sae.protocol.signing import SECRET_ENV
from steerserve.serve_process import ServeProcess

# Unit tests sign specs like the API does; test servers inherit the same deployment secret.
os.environ.setdefault(SECRET_ENV, "steerserve-test-secret")

ROOT = Path(__file__).resolve().parent.parent
STEERSERVE = [sys.executable, "-m", "steerserve"]
TINY_DIR = ROOT / ".state" / "tiny-qwen3.5"
SAE_LAYERS = (1, 2)
MODEL_NAME = "tiny"
API_KEY = "steerserve-test-key"  # the shared server requires it on every path but /health and /ping
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SERVER_START_TIMEOUT = 900
FEATURE_LABELS = [  # the shared server's --feature-labels file
    {"layer": 1, "index": 3, "label": "weather forecast"},
    {"layer": 2, "index": 9, "label": "Weather", "description": "the word weather"},
    {"layer": 1, "index": 10, "label": "rainy weather days"},
    {"layer": 2, "index": 20, "label": "climate", "description": "talks about the weather in general"},
    {"layer": 1, "index": 11, "label": "bakery"},
]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tests.fixtures.tiny_model import build_tiny_model

    return build_tiny_model(TINY_DIR)


def serve_args(model_dir: Path, *extra: str) -> list[str]:
    """`steerserve serve` options of the test servers (ServeProcess adds host and port)."""
    return [
        str(model_dir),
        "--sae", str(model_dir / "sae"), "--sae-layers", ",".join(map(str, SAE_LAYERS)),
        "--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "32",
        "--gpu-memory-utilization", "0.05", "--served-model-name", MODEL_NAME,
        "--max-num-batched-tokens", "128",  # long prompts prefill in chunks (test_differential)
        "--steering-kernel", "native",  # the kernel CPU servers use; a failed build fails the suite
        "--seed", "0", *extra,
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServeProcess:
    """A test server; `env` adds to server_env()."""
    running = ServeProcess(args, log_path, env=server_env() | (env or {}), cwd=ROOT)
    try:
        running.wait_ready(SERVER_START_TIMEOUT)
    except Exception:
        running.stop()
        raise
    return running


@contextmanager
def serving(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """A module's own server: started ready, stopped on exit."""
    running = start_server(args, log_path, env)
    try:
        yield running
    finally:
        running.stop()


# vLLM's two model runners; steerserve hooks both. V2 runs on the CPU build only with Triton's
# interpreter (tests/fixtures/triton_interpreter), about 20x slower per step, so the modules that
# test steering against the reference run both (fixture `runner_server`) and the rest V1.
RUNNERS = ("v1", "v2")
TRITON_INTERPRETER_DIR = ROOT / "tests" / "fixtures" / "triton_interpreter"


def runner_env(runner: str) -> dict[str, str]:
    """What a test server's environment adds to run vLLM's `runner` on this CPU build: the one
    place that turns on Triton's interpreter."""
    if runner == "v1":
        return {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    path = os.pathsep.join(p for p in (str(TRITON_INTERPRETER_DIR), os.environ.get("PYTHONPATH")) if p)
    return {"VLLM_USE_V2_MODEL_RUNNER": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": path}


def _shared_server(runner: str, tiny_model_dir: Path, tmp_path_factory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp(f"server-{runner}") / "server.log"
    data_dir = tmp_path_factory.mktemp(f"server-data-{runner}")  # Files/Batches API state of this session
    labels = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    labels.write_text("".join(json.dumps(row) + "\n" for row in FEATURE_LABELS))
    running = start_server(serve_args(tiny_model_dir, "--data-dir", str(data_dir), "--feature-labels", str(labels),
                                      "--api-key", API_KEY), log, runner_env(runner))
    running.runner = runner
    _SHARED_SERVERS[runner] = running
    print(f"\nsteerserve ({runner}, torch.compile) ready in {time.monotonic() - running.started:.0f}s", file=sys.stderr)
    try:
        yield running
    finally:
        running.stop()


_SHARED_SERVERS: dict[str, ServeProcess] = {}
_last_v2_test: list[str] = []  # node id of the last collected test on the V2 server


@pytest.hookimpl(trylast=True)  # after pytest grouped the tests by their module-scoped parameters
def pytest_collection_modifyitems(items) -> None:
    on_v2 = [item.nodeid for item in items
             if getattr(item, "callspec", None) is not None and item.callspec.params.get("runner_server") == "v2"]
    _last_v2_test[:] = on_v2[-1:]


def pytest_runtest_teardown(item, nextitem) -> None:
    """The V2 engine stops after its last test, not at the session's end: the modules after it
    start engines of their own on the same two cores."""
    if _last_v2_test and item.nodeid == _last_v2_test[0] and "v2" in _SHARED_SERVERS:
        _SHARED_SERVERS["v2"].stop()


@pytest.fixture(scope="session")
def v1_server(tiny_model_dir, tmp_path_factory) -> Iterator[ServeProcess]:
    yield from _shared_server("v1", tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def server(v1_server) -> ServeProcess:
    """The shared server, on the V1 runner (the CPU build's default)."""
    return v1_server


@pytest.fixture(scope="session")
def v2_server(tiny_model_dir, tmp_path_factory) -> Iterator[ServeProcess]:
    """The shared server's twin on Model Runner V2, started by the first module that asks."""
    yield from _shared_server("v2", tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module", params=RUNNERS)
def runner_server(request) -> ServeProcess:
    """The shared server of each runner in turn: a test that takes it (or runner_client,
    runner_http), or a module that overrides `server` with it, runs on V1, then on V2."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="module")
def runner_client(runner_server):
    return openai_client(runner_server)


@pytest.fixture(scope="module")
def runner_http(runner_server):
    with httpx.Client(base_url=runner_server.base_url, timeout=300, headers=AUTH) as c:
        yield c


# Modules that start engines of their own (prefix cache on a dense model, TP=2, DP=2) run V1 in
# CI and V2 too on request: each V2 engine costs a start (about a minute) plus interpreted steps,
# beyond the CI budget. STEERSERVE_TEST_V2_EVERYWHERE=1 adds V2 to their parametrisation.
V2_EVERYWHERE_ENV = "STEERSERVE_TEST_V2_EVERYWHERE"


def own_engine_runners() -> tuple[str, ...]:
    return RUNNERS if os.environ.get(V2_EVERYWHERE_ENV) == "1" else ("v1",)


def v1_only(server: ServeProcess, why: str) -> None:
    """Leaves a case out of the V2 subset (V2's interpreted steps cost CI minutes), saying why."""
    if server.runner != "v1":
        pytest.skip(f"V1 only: {why}")


@pytest.fixture(scope="session")
def default_server(tmp_path_factory) -> ServeProcess:
    """The shipped default model as `make serve` serves it (configs/default.yaml), compiled, with
    an API key; shared by test_default_model.py and test_playground.py. It serves an empty
    feature-dashboards file (`dashboards_file`) that a test may fill through it."""
    from steerserve.analysis.dashboard_store import DashboardStore

    model_dir = ROOT / "models" / "fortunes-qwen3.5"
    work = tmp_path_factory.mktemp("default-model")
    DashboardStore(work / "dashboards.db").close()
    args = [str(model_dir), "--config", str(ROOT / "configs" / "default.yaml"), "--sae", str(model_dir / "sae"),
            "--feature-labels", str(model_dir / "sae" / "labels.jsonl"), "--seed", "0",
            "--api-key", API_KEY, "--data-dir", str(work / "data"), "--feature-dashboards", str(work / "dashboards.db")]
    with serving(args, work / "server.log") as running:
        running.dashboards_file = work / "dashboards.db"
        yield running


def openai_client(server: ServeProcess):
    """The official client, against a test server (they all require API_KEY)."""
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def metric(server: ServeProcess, name: str) -> float:
    """The value of the first /metrics sample whose line starts with `name`."""
    text = httpx.get(f"{server.base_url}/metrics", headers=AUTH).text
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def engine_steps(server: ServeProcess) -> int:
    """Engine steps so far (the count of vLLM's tokens-per-step histogram)."""
    return int(metric(server, "vllm:iteration_tokens_total_count"))


def run_together(server: ServeProcess, work, items: list) -> tuple[list, int]:
    """work(client, item) for every item at once, and the engine steps they took together. Each
    thread has its own client and all start at a barrier: requests sent at once through one
    client's connection pool can be queued on one connection (encode/httpcore#822) and then
    run one after another, which a test of concurrency must not mistake for a shared batch."""
    clients = [openai_client(server) for _ in items]
    start = threading.Barrier(len(items))

    def one(i: int):
        start.wait()
        return work(clients[i], items[i])

    before = engine_steps(server)
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        results = list(pool.map(one, range(len(items))))
    return results, engine_steps(server) - before


@pytest.fixture(scope="session")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    from tests.hf_reference import load_reference

    return load_reference(tiny_model_dir)


PROMPT = [{"role": "user", "content": "Tell me about the weather today."}]


@pytest.fixture(scope="session")
def active_features(reference) -> dict[int, list[int]]:
    """Per steered layer, SAE features active at the last prompt position, most active first."""
    ids = reference.chat_prompt_ids(PROMPT)
    stream = reference.residual_stream(ids)
    result = {}
    for layer in SAE_LAYERS:
        acts = reference.encode(layer, stream[layer][-1:])[0]
        order = acts.argsort(descending=True)
        result[layer] = [int(i) for i in order if acts[i] > 0]
    return result
