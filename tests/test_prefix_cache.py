"""A request's output never depends on what the prefix cache holds (issue 12, part 2).

vLLM caches blocks of generated tokens too. Request A steered with `apply_to: "generation"`
computes its generated positions steered; request B with the same spec whose prompt is A's
prompt plus A's output would reuse those blocks as *prompt* positions, which B must compute
unsteered (and `apply_to: "prompt"` fails the same way in reverse). Each case below compares
B's first logprobs against B computed from scratch, and asserts through vLLM's
prefix_cache_hits counter whether the cache was used: the hybrid Qwen3.5 default never hits on
CPU, so these run on a dense Qwen3 (random weights, the default's tokenizer and SAEs).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import API_KEY, AUTH, own_engine_runners, runner_env, serving

PROMPT_TOKENS = 300
GENERATED = 100
TOLERANCE = 0.02  # cached and recomputed bf16 KV of the same tokens


def build_dense_model(tiny: Path, out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = json.loads((tiny / "config.json").read_text())
    dense = Qwen3Config(vocab_size=config["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                        initializer_range=0.1, tie_word_embeddings=False, eos_token_id=config["eos_token_id"],
                        pad_token_id=config["pad_token_id"], architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    Qwen3ForCausalLM(dense).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, out / name)
    shutil.copytree(tiny / "sae", out / "sae")
    return out


@pytest.fixture(scope="module", params=own_engine_runners())
def dense_server(request, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"dense-{request.param}")
    model = build_dense_model(tiny_model_dir, work / "model")
    args = [str(model), "--sae", str(model / "sae"), "--sae-layers", "1,2", "--dtype", "bfloat16",
            "--max-model-len", "1024", "--gpu-memory-utilization", "0.05", "--served-model-name", "dense",
            "--enforce-eager", "--seed", "0", "--api-key", API_KEY, "--data-dir", str(work / "data")]
    with serving(args, work / "server.log", runner_env(request.param)) as running:
        yield running


@pytest.fixture(scope="module")
def http(dense_server):
    with httpx.Client(base_url=dense_server.base_url, headers=AUTH, timeout=300) as client:
        yield client


def complete(http, prompt: list[int], steering, max_tokens: int, salt: str | None = None) -> dict:
    body = {"model": "dense", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "return_token_ids": True, "steering": steering}
    if salt:
        body["cache_salt"] = salt
    return http.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]


def cache_hits(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:prefix_cache_hits_total not in /metrics")


def continuation_case(http, steering, seed: int) -> tuple[list[float], list[float], float]:
    """(B's logprobs after A filled the cache, B's from scratch, cache hits B made)."""
    prompt = [5 + (seed * 7 + 13 * i) % 900 for i in range(PROMPT_TOKENS)]
    a = complete(http, prompt, steering, GENERATED)
    continued = prompt + a["token_ids"]
    hits_before = cache_hits(http)
    b = complete(http, continued, steering, 4)
    hits = cache_hits(http) - hits_before
    fresh = complete(http, continued, steering, 4, salt=f"fresh-{uuid.uuid4().hex}")
    return b["logprobs"]["token_logprobs"], fresh["logprobs"]["token_logprobs"], hits


def add(apply_to: str) -> dict:
    return {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}], "apply_to": apply_to}


@pytest.mark.parametrize("apply_to", ["generation", "prompt"])
def test_position_dependent_steering_never_reads_another_requests_blocks(http, apply_to):
    cached, fresh, hits = continuation_case(http, add(apply_to), seed=1 if apply_to == "generation" else 2)
    assert max(abs(a - b) for a, b in zip(cached, fresh)) < TOLERANCE
    assert hits == 0  # every such request has its own cache namespace


@pytest.mark.parametrize("steering", [None, add("all")], ids=["unsteered", "apply_to-all"])
def test_prefix_caching_still_serves_unsteered_and_all_position_steering(http, steering):
    cached, fresh, hits = continuation_case(http, steering, seed=3 if steering is None else 4)
    assert hits >= PROMPT_TOKENS  # A's prompt and most of its output came from the cache
    assert max(abs(a - b) for a, b in zip(cached, fresh)) < TOLERANCE
