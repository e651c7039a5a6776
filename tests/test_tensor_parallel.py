"""Tensor parallelism 2 gives the same steered and unsteered tokens, and the same dashboard
counts (only the first rank answers a take), as TP=1.

The only end-to-end check of the replicated-SAE design this repository can run: at a steered
layer's output every TP rank holds the whole residual stream, so each rank applies the same
edit with no communication (sae_plugins/steerserve_sae/steering/runtime.py). vLLM's CPU build runs TP=2 with
one OpenMP thread set per rank. The model is a random Qwen3.5 whose attention and linear
attention head counts divide by 2 (the embedded default's single linear key head cannot be
split); it reuses the default's tokenizer and 128-wide SAEs.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from steerserve_sae.protocol.capture import DASHBOARD_ARRAYS
from steerserve_sae.protocol.dashboard_merge import decode
from tests.conftest import AUTH, API_KEY, own_engine_runners, runner_env, server_env

# A random model is nearly uniform (top-2 margins ~0.2 nats, under the bf16 noise of TP's
# all-reduce order): a sharper unembedding makes most greedy choices clear. Its bf16 logits
# (|logit| 16-32) then step by 0.125, so TP=2 and TP=1 logprobs differ by a few such steps.
LOGIT_GAIN = 10.0
NEAR_TIE = 0.6  # nats
PROMPTS = ["Tell me about the weather today.", "Write a short poem about the sea.", "How do computers work?"]
STEERINGS = [
    None,
    {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 6.0}]},
    {"features": [{"layer": 2, "index": 20, "mode": "clamp", "value": 8.0},
                  {"layer": 1, "index": 600, "mode": "ablate"}]},
]


def build_divisible_model(tiny: Path, out: Path) -> Path:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = json.loads((tiny / "config.json").read_text())
    config.update(num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=64, linear_value_head_dim=64, initializer_range=0.1)
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**config)).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_GAIN)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, out / name)
    shutil.copytree(tiny / "sae", out / "sae")
    return out


def serve(model: Path, log: Path, tp: int, runner: str = "v1"):
    env = server_env() | runner_env(runner)
    extra = []
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
        extra = ["--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp"]
    args = [str(model), "--sae", str(model / "sae"), "--sae-layers", "1,2", "--dtype", "bfloat16",
            "--max-model-len", "512", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.05",
            "--served-model-name", "tp", "--enforce-eager", "--seed", "0", "--api-key", API_KEY,
            "--data-dir", str(log.parent / f"data-tp{tp}"), *extra]
    from steerserve.serve_process import ServeProcess

    running = ServeProcess(args, log, env=env)
    try:
        running.wait_ready(900)
    except Exception:
        running.stop()
        raise
    return running


def dashboard_counts(http: httpx.Client) -> dict[str, tuple[int, int]]:
    """Per layer, the tokens a dashboards batch of the prompts counted and its firings: both TP
    ranks record them, only the first may answer (else every count doubles)."""
    body = {"layers": [1, 2], "documents": [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)],
            "top_n": 3, "bins": 8, "low": 1e-2, "high": 1e2}
    layers = http.post("/v1/features/dashboards", json=body).raise_for_status().json()["layers"]
    return {layer: (result["tokens"], int(decode({k: base64.b64decode(v) if k in DASHBOARD_ARRAYS else v
                                                  for k, v in result.items()})["fired"].sum()))
            for layer, result in layers.items()}


def greedy_runs(base_url: str) -> list[dict]:
    out = []
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=300) as http:
        out.append(dashboard_counts(http))
        for prompt in PROMPTS:
            for steering in STEERINGS:
                body = {"model": "tp", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                        "temperature": 0, "logprobs": True, "top_logprobs": 2, "return_token_ids": True,
                        "steering": steering}
                choice = http.post("/v1/chat/completions", json=body).raise_for_status().json()["choices"][0]
                content = choice["logprobs"]["content"]
                out.append({"tokens": choice["token_ids"], "logprobs": [t["logprob"] for t in content],
                            "margins": [t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"]
                                        for t in content]})
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> Path:
    return build_divisible_model(tiny_model_dir, tmp_path_factory.mktemp("tp-model") / "model")


@pytest.mark.parametrize("runner", own_engine_runners())
def test_tp2_matches_tp1_steered_and_unsteered(model, tmp_path, runner):
    results = {}
    for tp in (1, 2):
        running = serve(model, tmp_path / f"tp{tp}.log", tp, runner)
        try:
            results[tp] = greedy_runs(running.base_url)
        finally:
            running.stop()
    dashboards = {tp: runs.pop(0) for tp, runs in results.items()}
    assert dashboards[1].keys() == dashboards[2].keys() == {"1", "2"}
    for layer, (tokens, fired) in dashboards[1].items():
        assert dashboards[2][layer][0] == tokens > 0
        assert abs(dashboards[2][layer][1] - fired) <= 0.05 * fired  # bf16 all-reduce order may flip a few
    compared = 0
    for i, (one, two) in enumerate(zip(results[1], results[2])):
        # Compare up to the first choice decided by less than NEAR_TIE: there, and after it, the
        # two runs may legitimately choose differently.
        for step, (a, b) in enumerate(zip(one["tokens"], two["tokens"])):
            if min(one["margins"][step], two["margins"][step]) < NEAR_TIE:
                break
            assert a == b, f"case {i}, step {step}: TP=1 chose {a} by {one['margins'][step]:.2f}, TP=2 chose {b}"
            assert abs(one["logprobs"][step] - two["logprobs"][step]) < NEAR_TIE, f"case {i}, step {step}"
            compared += 1
    assert compared >= 2 * len(results[1])  # the check is not vacuous
    for p in range(len(PROMPTS)):  # and steering really changed what both compared
        unsteered, *steered = results[1][p * len(STEERINGS):(p + 1) * len(STEERINGS)]
        assert all(s["logprobs"][0] != unsteered["logprobs"][0] for s in steered)
