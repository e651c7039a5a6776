"""Worker and API memory over repeated waves of clients that leave early (issue 21's reproduction).

Each wave sends, `--concurrency` at a time, `--streams` traced streams (every SAE layer, top 20)
whose clients read two chunks and hang up, and `--inspects` inspects whose clients give up after
0.05 s. After each wave (and a settle) it prints the RSS of the API process and of the engine
process(es), and the worker store gauges when the server has them. Against a running server
(`--base-url`, `--server-pid`) or one it starts itself on the default model:

    python bench/worker_memory_soak.py --waves 4 --streams 200 --inspects 200
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "fortunes-qwen3.5"
PROMPT = "Tell me a long fortune about the sea, the stars and a patient cat."


def rss_mib(server_pid: int) -> tuple[float, float]:
    """(API process, engine processes together) resident MiB: the server and its descendants."""
    server = psutil.Process(server_pid)
    api = server.memory_info().rss
    engine = sum(p.memory_info().rss for p in server.children(recursive=True) if p.is_running())
    return api / 2**20, engine / 2**20


def store_gauges(base_url: str, headers: dict) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    return {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("steerserve_worker_store")}


def left_stream(base_url: str, headers: dict, model: str, layers: list[int], residuals: bool = False) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64, "stream": True,
            "trace": {"layers": layers, "top_k": 20, "residuals": residuals}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 2:
                return  # hang up


def timed_out_inspect(base_url: str, headers: dict, model: str, layers: list[int], residuals: bool = False) -> None:
    body = {"model": model, "prompt": PROMPT * 4, "layers": layers, "top_k": 20}
    try:
        httpx.post(f"{base_url}/v1/features/inspect", json=body, headers=headers, timeout=0.05)
    except httpx.TimeoutException:
        pass


def wave(base_url: str, headers: dict, model: str, layers: list[int], streams: int, inspects: int,
         concurrency: int, residuals: bool = False) -> None:
    """One wave; `residuals`: the streams' traces also carry their residual vectors."""
    jobs = [left_stream] * streams + [timed_out_inspect] * inspects
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(job, base_url, headers, model, layers, residuals) for job in jobs]:
            future.result()


def soak(base_url: str, server_pid: int, headers: dict, waves: int, streams: int, inspects: int, concurrency: int,
         settle: float) -> list[dict]:
    models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"]
    model = models[0]["id"]
    layers = _loaded_layers(base_url, headers)
    rows = []
    api, engine = rss_mib(server_pid)
    rows.append({"wave": 0, "api_mib": round(api), "engine_mib": round(engine), **store_gauges(base_url, headers)})
    print(json.dumps(rows[-1]), flush=True)
    for n in range(1, waves + 1):
        started = time.monotonic()
        wave(base_url, headers, model, layers, streams, inspects, concurrency)
        time.sleep(settle)
        store_gauges(base_url, headers)  # a scrape asks the workers for fresh numbers; the next one shows them
        time.sleep(1.5)
        api, engine = rss_mib(server_pid)
        rows.append({"wave": n, "seconds": round(time.monotonic() - started, 1), "api_mib": round(api),
                     "engine_mib": round(engine), **store_gauges(base_url, headers)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _loaded_layers(base_url: str, headers: dict) -> list[int]:
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    return sorted(int(line.split('layer="')[1].split('"')[0]) for line in text.splitlines()
                  if line.startswith("steerserve_sae_memory_bytes{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (else one is started on the default model)")
    parser.add_argument("--server-pid", type=int, help="with --base-url: the server process (its children are the engine)")
    parser.add_argument("--api-key")
    parser.add_argument("--waves", type=int, default=4)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--inspects", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after a wave before measuring")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `steerserve serve` option (repeat)")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.base_url:
        if args.server_pid is None:
            sys.exit("--base-url needs --server-pid")
        soak(args.base_url, args.server_pid, headers, args.waves, args.streams, args.inspects, args.concurrency,
             args.settle)
        return
    from steerserve.serve_process import ServeProcess

    serve = [str(DEFAULT_MODEL), "--config", str(ROOT / "configs" / "default.yaml"), "--sae",
             str(DEFAULT_MODEL / "sae"), *args.serve_arg]
    log = Path(tempfile.mkdtemp()) / "server.log"
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    server = ServeProcess(serve, log, env=env, cwd=ROOT)
    try:
        server.wait_ready(900)
        soak(server.base_url, server.proc.pid, headers, args.waves, args.streams, args.inspects, args.concurrency,
             args.settle)
    finally:
        server.stop()
        print(f"server log: {log}", file=sys.stderr)


if __name__ == "__main__":
    main()
