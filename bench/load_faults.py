"""Load and faults against one real server: does it stay up, answer correctly and clean up?

Starts `steerserve serve` on the embedded tiny model (torch.compile on, an API key set,
--max-steering-configs smaller than the number of distinct specs sent) unless --base-url points
at a running one, then:
  1. load: N streamed and non-streamed requests, C in flight, mixing unsteered requests with
     more distinct steering specs than there are config slots, hostile bodies among them, and a
     share of clients that disconnect after the first chunk;
  2. cleanup: once idle, the admitted configs and the workers' slots in use return to 0;
  3. kill -9 during a batch (own server only): the server is killed mid-batch, restarted on
     the same data directory, and every input line must end with exactly one result.
Prints error counts by kind, p50/p99 latency, and the checks; exits 1 if a check fails.
Every request goes to loopback; the run is bounded in count and time.

    python bench/load_faults.py                       # ~4 minutes on the 2-core CPU machine
    python bench/load_faults.py --requests 600 --concurrency 200
    python bench/load_faults.py --base-url http://127.0.0.1:8000 --api-key KEY   # load phase only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KEY = "load-faults-key"  # of the server this script starts; --api-key for one given by --base-url
PROMPTS = ["Tell me about the weather.", "Write a short poem about the sea.", "How do computers work?", "hi"]


def request_body(i: int, rng: random.Random, distinct_specs: int) -> tuple[str, dict, str]:
    """(path, body, kind) for request i."""
    kind = rng.choices(["plain", "steered", "hostile"], weights=[4, 5, 1])[0]
    body: dict = {"model": "tiny", "max_tokens": rng.randint(4, 24), "temperature": 0, "stream": rng.random() < 0.5}
    if rng.random() < 0.5:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        path, body["prompt"] = "/v1/completions", rng.choice(PROMPTS)
    if kind == "steered":
        variant = rng.randrange(distinct_specs)  # one spec per variant: mode and value follow from it
        mode = ("add", "clamp", "scale", "ablate")[variant % 4]
        body["steering"] = {"features": [{"layer": 1 + variant % 2, "index": 3 + variant, "mode": mode,
                                          **({} if mode == "ablate" else {"value": 4.0})}]}
    elif kind == "hostile":
        body["vllm_xargs"] = rng.choice([{"steerserve_capture": "{}"}, {"steerserve_steering": "x"}])
    return path, body, kind


async def one_request(client: httpx.AsyncClient, path: str, body: dict, disconnect: bool) -> tuple[str, float]:
    """(outcome, seconds): outcome is 'ok', 'refused' (an expected 4xx), 'disconnected' or an error."""
    started = time.monotonic()
    try:
        async with client.stream("POST", path, json=body) as response:
            if disconnect and body.get("stream") and response.status_code == 200:
                async for _ in response.aiter_bytes():
                    break  # leave mid-stream: the server must abort and free the slot
                return "disconnected", time.monotonic() - started
            await response.aread()
        status = response.status_code
        outcome = "ok" if status == 200 else "refused" if 400 <= status < 500 else f"http_{status}"
    except httpx.HTTPError as exc:
        outcome = f"transport_{type(exc).__name__}"
    return outcome, time.monotonic() - started


async def load(base_url: str, key: str, requests: int, concurrency: int, distinct_specs: int,
               seed: int) -> tuple[Counter, list]:
    rng = random.Random(seed)
    plan = [(*request_body(i, rng, distinct_specs), rng.random() < 0.15) for i in range(requests)]
    outcomes: Counter = Counter()
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        queue = list(reversed(plan))

        async def worker() -> None:
            while queue:
                path, body, kind, disconnect = queue.pop()
                outcome, seconds = await one_request(client, path, body, disconnect)
                expected = "refused" if kind == "hostile" else ("ok", "disconnected")
                outcomes[outcome if outcome in expected else f"unexpected_{outcome}_for_{kind}"] += 1
                if outcome == "ok":
                    latencies.append(seconds)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, latencies


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(base_url: str, key: str, timeout: float = 60) -> tuple[float, float]:
    """(admitted configs, worker slots in use) once both are 0, or their last values."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
        values = metric(text, "steerserve_active_steering_configs"), metric(text, "steerserve_config_slots_in_use")
        if values == (0, 0) or time.monotonic() > deadline:
            return values
        time.sleep(1)


def batch_kill_restart(serve_args: list[str], data_dir: Path, log_dir: Path, lines: int) -> dict:
    """Submit a batch, kill -9 the server mid-batch, restart, and count each line's results."""
    from steerserve.serve_process import ServeProcess

    headers = {"Authorization": f"Bearer {KEY}"}
    content = "\n".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions", "body": {
        "model": "tiny", "prompt": PROMPTS[i % 4], "max_tokens": 200, "temperature": 0,
        **({"steering": {"features": [{"layer": 1, "index": i, "mode": "add", "value": 4.0}]}} if i % 2 else {})}})
        for i in range(lines)).encode()
    first = ServeProcess([*serve_args, "--data-dir", str(data_dir)], log_dir / "first.log", env=_env(), cwd=ROOT)
    first.wait_ready(900)
    http = httpx.Client(base_url=first.base_url, timeout=120, headers=headers)
    file_id = http.post("/v1/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
    batch_id = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                              "completion_window": "24h"}).json()["id"]
    deadline = time.monotonic() + 300
    while http.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    done_before_kill = http.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"]
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(60)
    second = ServeProcess([*serve_args, "--data-dir", str(data_dir)], log_dir / "second.log", env=_env(), cwd=ROOT)
    try:
        second.wait_ready(900)
        http = httpx.Client(base_url=second.base_url, timeout=120, headers=headers)
        deadline = time.monotonic() + 900
        while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] not in ("completed", "failed") \
                and time.monotonic() < deadline:
            time.sleep(1)
        results: Counter = Counter()
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                for line in http.get(f"/v1/files/{batch[key]}/content").text.splitlines():
                    results[json.loads(line)["custom_id"]] += 1
        return {"status": batch["status"], "done_before_kill": done_before_kill, "lines": lines,
                "answered_once": sum(1 for i in range(lines) if results[f"l{i}"] == 1),
                "duplicates": sum(1 for n in results.values() if n > 1)}
    finally:
        second.stop()


def _env() -> dict:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (serving the tiny model as `tiny`); "
                                           "skips starting one and the kill -9 phase")
    parser.add_argument("--api-key", default=KEY, help="the key of the --base-url server")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--distinct-specs", type=int, default=24)
    parser.add_argument("--max-steering-configs", type=int, default=8)
    parser.add_argument("--batch-lines", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    failures = []
    server = None
    work = Path(tempfile.mkdtemp(prefix="steerserve-load-"))
    from tests.fixtures.tiny_model import build_tiny_model

    model = build_tiny_model(ROOT / ".state" / "tiny-qwen3.5")
    serve_args = [str(model), "--sae", str(model / "sae"), "--sae-layers", "1,2", "--served-model-name", "tiny",
                  "--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "64",
                  "--gpu-memory-utilization", "0.05", "--api-key", KEY,
                  "--max-steering-configs", str(args.max_steering_configs)]
    base_url = args.base_url
    if base_url is None:
        from steerserve.serve_process import ServeProcess

        server = ServeProcess([*serve_args, "--data-dir", str(work / "load-data")], work / "server.log",
                              env=_env(), cwd=ROOT)
        print(f"server ready in {server.wait_ready(900):.0f}s (log: {server.log_path})")
        base_url = server.base_url
    try:
        started = time.monotonic()
        key = args.api_key if args.base_url else KEY
        outcomes, latencies = asyncio.run(load(base_url, key, args.requests, args.concurrency, args.distinct_specs,
                                               args.seed))
        wall = time.monotonic() - started
        latencies.sort()
        admitted_at_once = "the server's --max-steering-configs" if args.base_url else args.max_steering_configs
        print(f"\nload: {args.requests} requests, {args.concurrency} in flight, {args.distinct_specs} distinct specs "
              f"over {admitted_at_once} admitted at once, {wall:.1f}s")
        for outcome, count in sorted(outcomes.items()):
            print(f"  {outcome:<40} {count}")
        if latencies:
            print(f"  latency of completed requests: p50 {statistics.median(latencies):.2f}s, "
                  f"p99 {latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]:.2f}s")
        unexpected = sum(n for k, n in outcomes.items() if k.startswith("unexpected"))
        if unexpected:
            failures.append(f"{unexpected} unexpected outcomes")
        healthy = httpx.get(f"{base_url}/health", timeout=30).status_code == 200
        admitted, slots = wait_idle(base_url, key)
        print(f"after the load: /health {'200' if healthy else 'FAILED'}, admitted configs {admitted:.0f}, "
              f"worker slots in use {slots:.0f}")
        if not healthy or admitted or slots:
            failures.append("the server did not return to idle")
    finally:
        if server is not None:
            server.stop()
    if args.base_url is None:
        result = batch_kill_restart(serve_args, work / "batch-data", work, args.batch_lines)
        print(f"\nkill -9 mid-batch: {result}")
        if result["status"] != "completed" or result["answered_once"] != result["lines"]:
            failures.append("the batch did not finish every line exactly once after kill -9")
    print("\n" + ("FAILED: " + "; ".join(failures) if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
