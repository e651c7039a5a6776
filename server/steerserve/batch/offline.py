"""`steerserve run-batch -i in.jsonl -o out.jsonl MODEL --sae ... [serve options]`.

The honest way to get exactly the server's behaviour offline: start `steerserve serve` with
the given options on a free loopback port, push the file through the Files + Batches API,
follow it with a progress bar, download the results and stop the server. Successful lines go
to -o, failed ones to the errors file (default: -o with `.jsonl` replaced by `.errors.jsonl`),
both in OpenAI's batch output format and in input order; both files are always written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from steerserve.cli.help import DefaultsFormatter
from steerserve.serve_process import ServeProcess, ServerStartError, api_key_of, has_option

DESCRIPTION = "run a JSONL file of OpenAI batch requests through a temporary steerserve server"
EPILOG = (
    "Every other argument (MODEL, --sae, --sae-layers, --config, vLLM engine options, "
    "--batch-concurrency, --data-dir, --api-key: the requests send it) is passed to `steerserve serve`. "
    "Without --data-dir the "
    "server keeps its batch state in a temporary directory removed at the end."
)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerserve run-batch", description=DESCRIPTION, epilog=EPILOG,
                                allow_abbrev=False, formatter_class=DefaultsFormatter)
    p.add_argument("-i", "--input-file", required=True, type=Path, help="JSONL input, one request per line")
    p.add_argument("-o", "--output-file", required=True, type=Path, help="JSONL output of successful lines")
    p.add_argument("--errors-file", type=Path, default=None,
                   help="JSONL output of failed lines (default: OUTPUT with .errors.jsonl)")
    p.add_argument("--batch-endpoint", choices=ENDPOINTS, default=None,
                   help="the batch's endpoint (default: the url of the first request line)")
    p.add_argument("--server-log", type=Path, default=None,
                   help="keep the server's log here (default: none, a temporary file)")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for the server")
    return p


def errors_path_for(output: Path) -> Path:
    name = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(name + ".errors.jsonl")


def run_batch(argv: list[str]) -> int:
    args, serve_args = _parser().parse_known_args(argv)
    if not serve_args:
        _parser().error("give the MODEL (and its serve options) after the run-batch options")
    if not args.input_file.is_file():
        _parser().error(f"input file {args.input_file} does not exist")
    errors_file = args.errors_file or errors_path_for(args.output_file)
    endpoint = args.batch_endpoint or _endpoint_of(args.input_file)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="steerserve-run-batch-") as tmp:
        extra = [] if has_option(serve_args, "--data-dir") else ["--data-dir", os.path.join(tmp, "data")]
        log_path = args.server_log or Path(tmp) / "server.log"
        server = ServeProcess(serve_args + extra, log_path)
        print(f"run-batch: starting steerserve (log: {log_path})", file=sys.stderr)
        try:
            server.wait_ready(args.startup_timeout)
            ready = time.monotonic()
            print(f"run-batch: server ready in {ready - started:.1f}s", file=sys.stderr)
            with httpx.Client(base_url=server.base_url, timeout=600) as http:
                batch = _run(http, args.input_file, endpoint, api_key_of(serve_args))
                _download(http, batch.get("output_file_id"), args.output_file)
                _download(http, batch.get("error_file_id"), errors_file)
        except KeyboardInterrupt:
            print("run-batch: interrupted; stopping the server", file=sys.stderr)
            return 130
        except (_Failure, ServerStartError) as exc:
            print(f"run-batch: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    counts = batch["request_counts"]
    print(
        f"run-batch: {batch['status']}: {counts['total']} requests, {counts['completed']} completed, "
        f"{counts['failed']} failed; batch {time.monotonic() - ready:.1f}s, "
        f"wall {time.monotonic() - started:.1f}s\n"
        f"  output: {args.output_file}\n  errors: {errors_file}",
        file=sys.stderr,
    )
    return 0 if batch["status"] == "completed" else 1


class _Failure(Exception):
    pass


def _endpoint_of(path: Path) -> str:
    """The url of the first line that names a supported one (bad lines are the server's to report)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                continue
            if url in ENDPOINTS:
                return url
    return ENDPOINTS[0]


def _check(response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise _Failure(f"{response.request.method} {response.request.url.path}: "
                       f"HTTP {response.status_code} {response.text[:2000]}")
    return response.json()


def _run(http: httpx.Client, input_file: Path, endpoint: str, api_key: str | None) -> dict[str, Any]:
    from tqdm import tqdm

    if api_key:
        http.headers["authorization"] = f"Bearer {api_key}"
    with open(input_file, "rb") as f:
        uploaded = _check(http.post("/v1/files", files={"file": (input_file.name, f, "application/jsonl")},
                                           data={"purpose": "batch"}))
    batch = _check(http.post("/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "168h",
        "metadata": {"source": "steerserve run-batch"},
    }))
    bar = None
    try:
        while batch["status"] not in TERMINAL:
            counts = batch["request_counts"]
            if bar is None and counts["total"]:
                bar = tqdm(total=counts["total"], unit="req", desc="run-batch", file=sys.stderr)
            if bar is not None:
                bar.update(counts["completed"] + counts["failed"] - bar.n)
                bar.set_postfix(failed=counts["failed"], refresh=False)
            time.sleep(0.5)
            batch = _check(http.get(f"/v1/batches/{batch['id']}"))
        if bar is not None:
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
    finally:
        if bar is not None:
            bar.close()
    if batch["status"] == "failed":
        lines = "\n".join(f"  line {e.get('line')}: {e['code']}: {e['message']}" for e in batch["errors"]["data"])
        raise _Failure(f"the batch failed validation:\n{lines}")
    return batch


def _download(http: httpx.Client, file_id: str | None, path: Path) -> None:
    """Writes the file's content to `path` (an empty file when the batch produced none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_id is None:
        path.write_bytes(b"")
        return
    with http.stream("GET", f"/v1/files/{file_id}/content") as response:
        if response.status_code >= 400:
            response.read()
            _check(response)
        with open(path, "wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
