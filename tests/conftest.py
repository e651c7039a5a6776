"""Shared fixtures: one tiny model build and ONE steerserve server per test session.

The server is the real product: `steerserve serve` in a subprocess (vLLM with torch.compile on,
the default), reached over HTTP. Starting vLLM costs about a minute on CPU, so every HTTP test
shares it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
STEERSERVE = [sys.executable, "-m", "server"]
TINY_DIR = ROOT / ".state" / "tiny-qwen3.5"
SAE_LAYERS = (1, 2)
MODEL_NAME = "tiny"
SERVER_START_TIMEOUT = 900
FEATURE_LABELS = [  # the shared server's --feature-labels file
    {"layer": 1, "index": 3, "label": "weather forecast"},
    {"layer": 2, "index": 9, "label": "Weather", "description": "the word weather"},
    {"layer": 1, "index": 10, "label": "rainy weather days"},
    {"layer": 2, "index": 20, "label": "climate", "description": "talks about the weather in general"},
    {"layer": 1, "index": 11, "label": "bakery"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from server.tiny_model import build_tiny_model

    return build_tiny_model(TINY_DIR)


def server_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        *STEERSERVE, "serve", str(model_dir),
        "--sae", str(model_dir / "sae"), "--sae-layers", ",".join(map(str, SAE_LAYERS)),
        "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "32",
        "--gpu-memory-utilization", "0.05", "--served-model-name", MODEL_NAME,
        "--seed", "0", *extra,
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


class RunningServer:
    def __init__(self, command: list[str], log_path: Path, new_session: bool = False):
        """new_session: the server and vLLM's engine processes get their own process group
        (tests that SIGKILL the whole server use it, so no orphan engine keeps running)."""
        self.log_path = log_path
        self.port = int(command[command.index("--port") + 1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT,
                                     start_new_session=new_session)

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory) -> RunningServer:
    log = tmp_path_factory.mktemp("server") / "server.log"
    data_dir = tmp_path_factory.mktemp("server-data")  # Files/Batches API state of this session
    labels = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    labels.write_text("".join(json.dumps(row) + "\n" for row in FEATURE_LABELS))
    command = server_command(tiny_model_dir, free_port(), "--data-dir", str(data_dir), "--feature-labels", str(labels))
    running = RunningServer(command, log)
    try:
        elapsed = running.wait_ready()
        print(f"\nsteerserve (torch.compile) ready in {elapsed:.0f}s", file=sys.stderr)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as c:
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
