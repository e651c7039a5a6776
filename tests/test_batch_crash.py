"""A batch survives `kill -9` of the whole server: after a restart on the same data directory
every input line ends with exactly one output or error line, none lost, none duplicated."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx

from steerserve.serve_process import ServeProcess
from tests.conftest import MODEL_NAME, PROMPT, serve_args, start_server

LINES = 30
MAX_TOKENS = 500  # ~30 lines at 4 in flight: long enough to kill it midway


def start(tiny_model_dir, data_dir, log):
    return start_server(serve_args(tiny_model_dir, "--enforce-eager", "--data-dir", str(data_dir)), log)


def kill_group(server: ServeProcess) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the engine's processes die with the group
        try:
            os.killpg(server.proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError("processes of the killed server are still alive")


def batch_lines() -> bytes:
    out = []
    for i in range(LINES):
        body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        if i % 3 == 1:
            body["steering"] = {"features": [{"layer": 1, "index": i, "mode": "add", "value": 6.0}]}
        if i == 7:
            body["steering"] = {"features": [{"layer": 5, "index": 0, "mode": "add", "value": 1.0}]}  # 400
        out.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}))
    return ("\n".join(out) + "\n").encode()


def test_sigkill_mid_batch_then_restart_finishes_each_line_once(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    first = start(tiny_model_dir, data_dir, tmp_path / "first.log")
    try:
        http = httpx.Client(base_url=first.base_url, timeout=60)
        f = http.post("/v1/files", files={"file": ("in.jsonl", batch_lines())}, data={"purpose": "batch"}).json()
        batch = http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]
            if counts["completed"] >= 4:
                break
            time.sleep(0.2)
        assert 4 <= counts["completed"] + counts["failed"] < LINES, counts  # really mid-batch
        kill_group(first)
    finally:
        first.stop()

    second = start(tiny_model_dir, data_dir, tmp_path / "second.log")
    try:
        http = httpx.Client(base_url=second.base_url, timeout=60)
        resumed = http.get(f"/v1/batches/{batch['id']}").json()
        assert resumed["request_counts"]["completed"] >= counts["completed"]  # nothing recorded was lost
        deadline = time.monotonic() + 240
        while resumed["status"] not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, resumed
            time.sleep(0.5)
            resumed = http.get(f"/v1/batches/{batch['id']}").json()
        assert resumed["status"] == "completed"
        assert resumed["request_counts"] == {"total": LINES, "completed": LINES - 1, "failed": 1}
        results = []
        for key in ("output_file_id", "error_file_id"):
            text = http.get(f"/v1/files/{resumed[key]}/content").text
            results += [json.loads(x) for x in text.splitlines()]
        ids = sorted(r["custom_id"] for r in results)
        assert ids == sorted(f"line-{i}" for i in range(LINES))  # exactly one result per line
        (error,) = [r for r in results if r["response"]["status_code"] != 200]
        assert error["custom_id"] == "line-7"
        assert error["response"]["body"]["error"]["code"] == "layer_not_loaded"
        assert all(len(r["response"]["body"]["choices"][0]["message"]["content"]) > 0
                   for r in results if r is not error)
    finally:
        second.stop()
