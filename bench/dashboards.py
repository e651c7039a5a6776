"""Dashboard-building throughput as a ratio to plain prefill of the same texts on the same engine.

Starts `steerserve serve` on the default model once (or uses --base-url), then, alternating
over --repeats rounds so the machine's drift hits every arm alike:
  * plain: every text as a prompt-only completion (max_tokens 1, no capture, a cache salt per
    request so every position is computed), 64 in flight (the engine runs --max-num-seqs of them);
  * dashboards at 1 layer and at all --layers: `steerserve dashboards`' own build loop into a
    fresh file (analysis/dashboards.build, logit lens excluded: it is per feature, not per token).
Prints prompt tokens/s of each arm and the dashboard arms' median ratio to the plain arm.

    python bench/dashboards.py --data held_out.jsonl --max-docs 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerserve.analysis import dashboards  # noqa: E402
from steerserve.analysis.dashboard_store import DashboardStore  # noqa: E402
from steerserve.analysis.eval import DEFAULT_TEXTS  # noqa: E402
from steerserve.serve_process import ServeProcess  # noqa: E402

MODEL = ROOT / "models" / "fortunes-qwen3.5"


def plain(http: httpx.Client, model: str, docs: list[dict], in_flight: int) -> tuple[int, float]:
    def one(doc: dict) -> int:
        body = {"model": model, "prompt": doc["prompt"], "max_tokens": 1, "cache_salt": uuid.uuid4().hex}
        return dashboards._ok(http.post("/v1/completions", json=body))["usage"]["prompt_tokens"]

    started = time.monotonic()
    with ThreadPoolExecutor(in_flight) as pool:
        tokens = sum(pool.map(one, docs))
    return tokens, time.monotonic() - started


def dashboard(http: httpx.Client, docs: list[dict], layers: list[int], batch: int, tmp: Path) -> tuple[int, float]:
    path = tmp / f"{uuid.uuid4().hex}.db"
    store = DashboardStore(path)
    original, dashboards.fill_lens = dashboards.fill_lens, lambda http, store: None
    try:
        summary = dashboards.build(http, store, docs, layers, 20, batch)
    finally:
        dashboards.fill_lens = original
        store.close()
        path.unlink()
    return summary["tokens"], summary["seconds"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=DEFAULT_TEXTS)
    p.add_argument("--max-docs", type=int, default=512)
    p.add_argument("--layers", default="1,2,3")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base-url")
    args = p.parse_args()
    docs = dashboards.read_documents(args.data)[: args.max_docs]
    docs = [d for d in docs if "prompt" in d]
    layers = [int(x) for x in args.layers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.base_url is None:
            server = ServeProcess([str(MODEL), "--config", str(ROOT / "configs" / "default.yaml"),
                                   "--sae", str(MODEL / "sae")], Path(tmp) / "server.log")
            server.wait_ready(1800)
        try:
            with httpx.Client(base_url=args.base_url or server.base_url, timeout=3600,
                              limits=httpx.Limits(max_connections=256)) as http:
                model = dashboards._ok(http.get("/v1/models"))["data"][0]["id"]
                plain(http, model, docs[:64], 64)  # warm-up
                arms = {"plain": [], "1 layer": [], f"{len(layers)} layers": []}
                for _ in range(args.repeats):
                    for name in arms:
                        tokens, seconds = (plain(http, model, docs, 64) if name == "plain" else
                                           dashboard(http, docs, layers[-1:] if name == "1 layer" else layers,
                                                     args.batch_size, Path(tmp)))
                        arms[name].append(tokens / seconds)
        finally:
            if server is not None:
                server.stop()
    result = {name: round(statistics.median(rates), 1) for name, rates in arms.items()}
    ratios = {name: round(statistics.median(r / p for r, p in zip(arms[name], arms["plain"])), 3)
              for name in arms if name != "plain"}
    print(json.dumps({"documents": len(docs), "tokens_per_second": result, "ratio_to_plain": ratios}))


if __name__ == "__main__":
    main()
