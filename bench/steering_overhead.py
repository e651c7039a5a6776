"""Throughput cost of steering, measured end to end over HTTP on one engine.

Starts `steerserve serve` once (torch.compile on, SAEs at 4 layers) unless --base-url points at
a running server, then measures, on that same engine:
  * decode (completion tokens/s) and total (prompt+completion tokens/s) throughput with 0%, 50%
    and 100% of requests steered, steering 1 or 4 layers, at concurrency 1, 8 and 32, as ratios
    to the unsteered run at the same concurrency;
  * throughput with K = 1, 8, 32, 64 distinct steering configs in flight, relative to K = 1;
  * gated steering (`when`) against the same edits ungated: the gate on the edited layer, and
    on another layer (which then needs an encode of its own);
  * direction vectors: a vector `add` against the feature `add` at 1 and all steered layers,
    and a vector `ablate` (a projection per row and layer) against unsteered requests;
  * traces: untraced requests' throughput beside traced ones (half the clients trace every
    layer), as a ratio to the same untraced requests beside untraced ones; and all clients
    tracing against none.
Each cell interleaves baseline and variant arms (AB BA AB BA ...), --repeats pairs of arms at
least --arm-seconds long, after a warm-up pass over every shape: this machine's speed drifts by
10-25% from second to second, so a cell's ratio is the median of many short pairs' ratios, the
spread is their interquartile range, and the rows that measure a configuration against itself
(0% vs 0%, K=1, ungated, untraced) are the bench's own noise floor. Each simulated client holds
its own connection (see run_load). A cell also reports the steering share, from one more
variant arm: the fraction of the workers' model-execution host time spent in steering (routing
+ the op), measured inside the same steps, so it does not drift; the 0% row is the unsteered
overhead (routing only). steer/wall is the share of that arm's wall time the engine spent
steering: on CPU, the throughput steering costs. On GPU the counters see launch time only, and
the throughput ratios are the measure.
Steered requests clamp one feature per steered layer (the costly path: a full TopK encode).

    python bench/steering_overhead.py                        # CPU: the embedded tiny model
    python bench/steering_overhead.py --model /models/Qwen3.5-27B --sae /models/SAE... \
        --layers 16,24,32,48 -- --tensor-parallel-size 4      # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def clamp_spec(layers: list[int], variant: int, gate_layer: int | None = None) -> dict:
    """A clamp of one feature per layer; with `gate_layer`, each gated by feature 11 there."""
    gate = {} if gate_layer is None else {"when": {"layer": gate_layer, "index": 11, "above": 0.5}}
    return {"features": [{"layer": layer, "index": (7 + 13 * variant) % 512, "mode": "clamp", "value": 4.0} | gate
                         for layer in layers]}


def feature_add_spec(layers: list[int]) -> dict:
    return {"features": [{"layer": layer, "index": 7, "mode": "add", "value": 4.0} for layer in layers]}


def vector_spec(layers: list[int], mode: str, d_model: int) -> dict:
    """One random direction per layer, added (value 4) or ablated."""
    rng = np.random.default_rng(0)
    value = {"value": 4.0} if mode == "add" else {}
    return {"vectors": [{"layer": layer, "mode": mode, "vector": base64.b64encode(
        rng.standard_normal(d_model).astype("<f4").tobytes()).decode()} | value for layer in layers]}


async def send(client: httpx.AsyncClient, base_url: str, i: int, spec: dict | None, max_tokens: int,
               extra: dict | None = None) -> tuple[int, int]:
    """One completion request (with `extra` body fields); returns its (completion, prompt) tokens."""
    body = {"model": "bench", "prompt": f"Request {i}: the weather report for today says",
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **(extra or {})}
    if spec is not None:
        body["steering"] = spec
    response = await client.post(f"{base_url}/v1/completions", content=json.dumps(body),
                                 headers={"content-type": "application/json"})
    response.raise_for_status()
    usage = response.json()["usage"]
    return usage["completion_tokens"], usage["prompt_tokens"]


async def run_load(base_url: str, specs: list[dict | None], concurrency: int, max_tokens: int,
                   seconds: float = 0.0, client_extras: list[dict | None] = (None,)) -> tuple[int, int, float]:
    """`concurrency` closed-loop clients, request i carrying specs[i % len(specs)]: each sends
    its next request as soon as the last one returns, until len(specs) requests were sent and
    `seconds` have passed, so the batch stays full and an arm has one ramp-up and one drain.
    Client j adds client_extras[j % len] to its bodies; only the tokens of clients whose extras
    are client_extras[0] count (the others are load beside them).
    Returns (completion tokens, total tokens, wall seconds)."""
    sent = completion = prompt = 0
    start = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient, j: int) -> None:
        nonlocal sent, completion, prompt
        extra = client_extras[j % len(client_extras)]
        while sent < len(specs) or time.perf_counter() - start < seconds:
            i = sent
            sent += 1
            c, p = await send(client, base_url, i, specs[i % len(specs)], max_tokens, extra)
            if j % len(client_extras) == 0:
                completion, prompt = completion + c, prompt + p

    async def own_connection(j: int) -> None:
        # One client (so one keep-alive connection) per simulated user: httpcore's shared pool
        # can hand one idle connection to several requests queued at once, which then run one
        # after another (encode/httpcore#822, #1111): the batch shrinks at random and two
        # identical arms differed by 2x.
        async with httpx.AsyncClient(timeout=600) as client:
            await client_loop(client, j)

    await asyncio.gather(*(own_connection(j) for j in range(concurrency)))
    return completion, completion + prompt, time.perf_counter() - start


def _specs_and_extras(arm) -> tuple[list, tuple]:
    return arm if isinstance(arm, tuple) else (arm, (None,))


async def timed_load(base_url: str, arm, concurrency: int, args) -> tuple[int, int, float]:
    """One arm, `arm` = specs or (specs, client_extras): run_load for at least --arm-seconds.
    Returns (completion tokens, total tokens, seconds)."""
    specs, extras = _specs_and_extras(arm)
    return await run_load(base_url, specs, concurrency, args.max_tokens, args.arm_seconds, extras)


async def worker_metrics(base_url: str) -> dict[str, float]:
    """The server's /metrics samples, with worker counters freshly read: a scrape asks the
    workers for a new snapshot at most once a second, so scrape, wait, scrape."""
    async with httpx.AsyncClient(timeout=60) as client:
        await client.get(f"{base_url}/metrics")
        await asyncio.sleep(1.2)
        text = (await client.get(f"{base_url}/metrics")).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def worker_seconds(base_url: str) -> tuple[float, float]:
    """(steering, execute) host seconds from the server's worker counters."""
    samples = await worker_metrics(base_url)
    return samples["steerserve_steering_host_seconds_total"], samples["steerserve_model_execute_host_seconds_total"]


async def paired_ratio(base_url: str, base, variant, concurrency: int, args, share: bool = True) -> tuple[float, ...]:
    """Runs base and variant as `args.repeats` interleaved pairs, alternating which goes first
    (AB BA AB ...), each arm at least --arm-seconds. This machine's speed drifts by 10-25% from
    one second to the next (a plain matmul loop shows it), so a ratio needs many short pairs:
    the cell's ratio is the median of the per-pair ratios, and their interquartile range is
    reported as the spread.

    base and variant: the specs of each arm, or (specs, client_extras) (see run_load).
    Returns: the median variant/base throughput ratios (decode, total), the interquartile range
    of the per-pair decode ratios, the variant throughputs (decode, total) over all its arms,
    and (with `share`) the steering time of one more variant arm of --share-seconds, which the
    workers measure inside the same steps and so does not drift with the machine, as a share of
    their model-execution time and of the arm's wall time. On CPU the steering time is the
    steering cost itself, so its share of the wall time is the throughput it costs."""
    decode_ratios, total_ratios, variant_sums = [], [], [0, 0, 0.0]
    for repeat in range(args.repeats):
        rates = {}
        for arm in (("base", "variant") if repeat % 2 == 0 else ("variant", "base")):
            c, t, e = await timed_load(base_url, base if arm == "base" else variant, concurrency, args)
            rates[arm] = (c / e, t / e)
            if arm == "variant":
                variant_sums = [variant_sums[0] + c, variant_sums[1] + t, variant_sums[2] + e]
        decode_ratios.append(rates["variant"][0] / rates["base"][0])
        total_ratios.append(rates["variant"][1] / rates["base"][1])
    quartiles = statistics.quantiles(decode_ratios, n=4)
    steer_share = wall_share = float("nan")
    if share:
        steer0, exec0 = await worker_seconds(base_url)
        specs, extras = _specs_and_extras(variant)
        _, _, seconds = await run_load(base_url, specs, concurrency, args.max_tokens, args.share_seconds, extras)
        steer1, exec1 = await worker_seconds(base_url)
        steer_share, wall_share = (steer1 - steer0) / max(exec1 - exec0, 1e-9), (steer1 - steer0) / seconds
    return (statistics.median(decode_ratios), statistics.median(total_ratios), quartiles[2] - quartiles[0],
            variant_sums[0] / variant_sums[2], variant_sums[1] / variant_sums[2], steer_share, wall_share)


def steering_matrix(layers: list[int], n: int) -> list[tuple[str, str, list]]:
    one, four = layers[:1], layers[:4]
    rows = []
    for steered_layers in (one, four):
        for fraction, label in ((0.5, "50%"), (1.0, "100%")):
            specs = [clamp_spec(steered_layers, 0) if (i % 2 == 0 or fraction == 1.0) else None for i in range(n)]
            rows.append((str(len(steered_layers)), label, specs))
    return rows


async def measure(args, base_url: str) -> None:
    layers = [int(x) for x in args.layers.split(",")]
    prefix = 'steerserve_steering_kernel{kernel="'
    kernels = [name[len(prefix):-2] for name in await worker_metrics(base_url) if name.startswith(prefix)]
    print(f"steering op: {', '.join(kernels) or 'unknown'}")
    sections = set(args.sections.split(","))
    if "steering" in sections:
        await steering_section(args, base_url, layers)
    if "configs" in sections:
        await configs_section(args, base_url, layers)
    if "gated" in sections:
        await gated_section(args, base_url, layers)
    if "vectors" in sections:
        await vectors_section(args, base_url, layers)
    if "traced" in sections:
        await traced_section(args, base_url, layers)


async def steering_section(args, base_url: str, layers: list[int]) -> None:
    print("warm-up: every batch shape and steering mix once (CPU matmul kernels are built per shape)")
    for concurrency in (1, 8, 32):
        n = max(2 * concurrency, args.min_requests)
        await run_load(base_url, [None] * n, concurrency, args.max_tokens)
        for _, _, specs in steering_matrix(layers, n):
            await run_load(base_url, specs, concurrency, args.max_tokens)
    print(f"\nsteered fraction x steered layers x concurrency: {args.repeats} interleaved pairs of "
          f">= {args.arm_seconds:g} s arms, median ratio to 0% steered ({args.max_tokens} tokens/request); "
          f"spread = interquartile range of the per-pair decode ratios")
    print(f"{'conc':>5} {'layers':>7} {'steered':>8} {'decode tok/s':>13} {'total tok/s':>12} "
          f"{'decode ratio':>13} {'spread':>7} {'total ratio':>12} {'steer/execute':>14} {'steer/wall':>11}")
    noise = []
    for concurrency in (1, 8, 32):
        n = max(2 * concurrency, args.min_requests)
        cells = [("-", "0%", [None] * n), *steering_matrix(layers, n)]
        for layer_label, label, specs in cells:
            decode_ratio, total_ratio, spread, decode, total, share, wall = await paired_ratio(
                base_url, [None] * n, specs, concurrency, args)
            if label == "0%":
                noise.append(decode_ratio)
            print(f"{concurrency:>5} {layer_label:>7} {label:>8} {decode:>13.1f} {total:>12.1f} "
                  f"{decode_ratio:>13.3f} {spread:>7.3f} {total_ratio:>12.3f} {share:>14.1%} {wall:>11.1%}")
    print(f"noise floor (0% steered against itself): decode ratios {min(noise):.3f} .. {max(noise):.3f}, "
          f"so differences within {max(abs(r - 1) for r in noise):.1%} of 1.00 are not resolved")


async def configs_section(args, base_url: str, layers: list[int]) -> None:
    print(f"\ndistinct steering configs in flight (concurrency 32, 1 layer, all requests steered): "
          f"{args.repeats} interleaved pairs against K=1 (the K=1 row is the noise floor here)")
    print(f"{'K':>4} {'decode tok/s':>13} {'ratio to K=1':>13} {'spread':>7} {'steer/execute':>14} {'steer/wall':>11}")
    n = max(64, args.min_requests)
    reference = [clamp_spec(layers[:1], 0) for _ in range(n)]
    for k in (1, 8, 32, 64):
        specs = [clamp_spec(layers[:1], i % k) for i in range(n)]
        await run_load(base_url, specs, 32, args.max_tokens)  # warm-up: install the K configs once
        decode_ratio, _, spread, decode, _, share, wall = await paired_ratio(base_url, reference, specs, 32, args)
        print(f"{k:>4} {decode:>13.1f} {decode_ratio:>13.3f} {spread:>7.3f} {share:>14.1%} {wall:>11.1%}")


async def gated_section(args, base_url: str, layers: list[int]) -> None:
    """Gated against the same edits ungated, all requests steered; the ungated-vs-ungated row
    is this section's noise floor."""
    print(f"\ngated vs ungated steering (all requests steered; gate: feature 11 of layer {layers[0]} above 0.5): "
          f"{args.repeats} interleaved pairs")
    print(f"{'conc':>5} {'case':>26} {'decode tok/s':>13} {'ratio':>7} {'spread':>7} {'steer/execute':>14} "
          f"{'steer/wall':>11}")
    cases = [("ungated vs itself", layers[:1], None), ("gate on the edited layer", layers[:1], layers[0]),
             ("4 layers, gate on the 1st", layers[:4], layers[0]), ("gate on an unedited layer", layers[-1:], layers[0])]
    for concurrency in (8, 32):
        n = max(2 * concurrency, args.min_requests)
        for name, edited, gate_layer in cases:
            base = [clamp_spec(edited, 0)] * n
            variant = [clamp_spec(edited, 0, gate_layer)] * n
            await run_load(base_url, variant, concurrency, args.max_tokens)  # warm-up
            decode_ratio, _, spread, decode, _, share, wall = await paired_ratio(base_url, base, variant, concurrency, args)
            print(f"{concurrency:>5} {name:>26} {decode:>13.1f} {decode_ratio:>7.3f} {spread:>7.3f} {share:>14.1%} "
                  f"{wall:>11.1%}")


async def vectors_section(args, base_url: str, layers: list[int]) -> None:
    """Vector `add` against the feature `add` it can stand for (both fold into one precomputed
    vector per config), and `ablate` (a projection per row) against unsteered; all requests
    steered. The feature-add-vs-itself row is this section's noise floor."""
    async with httpx.AsyncClient(timeout=60) as client:
        d_model = (await client.get(f"{base_url}/v1/saes")).json()["data"][0]["d_model"]
    print(f"\ndirection vectors (all requests steered, d_model {d_model}): {args.repeats} interleaved pairs")
    print(f"{'conc':>5} {'case':>34} {'decode tok/s':>13} {'ratio':>7} {'spread':>7} {'steer/execute':>14} "
          f"{'steer/wall':>11}")
    one, every = layers[:1], layers
    cases = [("feature add vs itself", feature_add_spec(one), feature_add_spec(one)),
             ("vector add vs feature add, 1 layer", feature_add_spec(one), vector_spec(one, "add", d_model)),
             (f"vector add vs feature add, {len(every)} layers", feature_add_spec(every),
              vector_spec(every, "add", d_model)),
             ("ablate vs unsteered, 1 layer", None, vector_spec(one, "ablate", d_model)),
             (f"ablate vs unsteered, {len(every)} layers", None, vector_spec(every, "ablate", d_model))]
    for concurrency in (8, 32):
        n = max(2 * concurrency, args.min_requests)
        for name, base, variant in cases:
            await run_load(base_url, [variant] * n, concurrency, args.max_tokens)  # warm-up
            decode_ratio, _, spread, decode, _, share, wall = await paired_ratio(
                base_url, [base] * n, [variant] * n, concurrency, args)
            print(f"{concurrency:>5} {name:>34} {decode:>13.1f} {decode_ratio:>7.3f} {spread:>7.3f} {share:>14.1%} "
                  f"{wall:>11.1%}")


async def traced_section(args, base_url: str, layers: list[int]) -> None:
    """The untraced clients' throughput with traced neighbours (half the clients) against the
    same clients with untraced neighbours; then every client tracing against none."""
    trace = {"trace": {"layers": layers, "top_k": 5}}
    print(f"\ntraces (top 5 at layers {layers}): {args.repeats} interleaved pairs; the untraced-beside-"
          "untraced row is this section's noise floor")
    print(f"{'conc':>5} {'case':>34} {'decode tok/s':>13} {'ratio':>7} {'spread':>7}")
    cases = [("untraced beside untraced", (None, None)), ("untraced beside traced (half)", (None, trace)),
             ("all traced vs none (all counted)", (trace,))]
    for concurrency in (8, 32):
        n = max(2 * concurrency, args.min_requests)
        for name, extras in cases:
            base, variant = ([None] * n, (None,) * len(extras)), ([None] * n, extras)
            await run_load(base_url, [None] * n, concurrency, args.max_tokens, 0.0, extras)  # warm-up
            decode_ratio, _, spread, decode, *_ = await paired_ratio(base_url, base, variant, concurrency, args,
                                                                     share=False)
            print(f"{concurrency:>5} {name:>34} {decode:>13.1f} {decode_ratio:>7.3f} {spread:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / ".state" / "tiny-qwen3.5"))
    parser.add_argument("--sae", default=None, help="default: MODEL/sae")
    parser.add_argument("--layers", default="0,1,2,3")
    parser.add_argument("--base-url", default=None, help="use a running server (started with these --layers)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved pairs per cell")
    parser.add_argument("--arm-seconds", type=float, default=1.5, help="minimum wall time of each arm of a pair")
    parser.add_argument("--share-seconds", type=float, default=3.0,
                        help="wall time of the variant arm whose steering share is measured")
    parser.add_argument("--sections", default="steering,configs,gated,vectors,traced",
                        help="comma-separated subset of: steering, configs, gated, vectors, traced")
    parser.add_argument("--log", default="/tmp/steerserve-bench.log")
    parser.add_argument("engine_args", nargs="*", help="extra `steerserve serve` arguments after --")
    args = parser.parse_args()
    args.sae = args.sae or str(Path(args.model) / "sae")
    server = None
    base_url = args.base_url
    if base_url is None:
        engine_args = list(args.engine_args)
        if args.model == str(ROOT / ".state" / "tiny-qwen3.5"):
            from tests.fixtures.tiny_model import build_tiny_model

            build_tiny_model(args.model)
            engine_args = ["--dtype", "bfloat16", "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
                           *engine_args]
        from steerserve.serve_process import ServeProcess

        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        server = ServeProcess([args.model, "--sae", args.sae, "--sae-layers", args.layers, "--served-model-name",
                               "bench", "--max-num-seqs", "64", *engine_args], Path(args.log), env=env, cwd=ROOT)
        base_url = server.base_url
    try:
        if server is not None:
            print(f"server ready after {server.wait_ready(1800):.0f}s ({base_url})")
        asyncio.run(measure(args, base_url))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

