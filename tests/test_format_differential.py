"""Every SAE format, every mode, against the independent reference (issue 12, part 1).

The embedded default's Qwen-Scope SAEs are rewritten in the other published layouts, each
with its own semantics switched on: SAELens standard with `apply_b_dec_to_input` and a
JumpReLU with negative thresholds (one server, one architecture per layer folder), SAELens
TopK, and EleutherAI sparsify (which encodes x - b_dec). Each set is served compiled, and the
greedy tokens and logprobs must match tests/hf_reference.py, which reads the files and
encodes by each format's definition itself.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import API_KEY, PROMPT, openai_client, serve_args, start_server
from tests.test_differential import LOGPROB_TOLERANCE, MAX_TOKENS, server_greedy

LAYERS = (1, 2)


def qwen_scope(tiny_model_dir, layer: int) -> dict[str, torch.Tensor]:
    return torch.load(tiny_model_dir / "sae" / f"layer{layer}.sae.pt", weights_only=True)


def shifted_b_dec(d_model: int, layer: int) -> torch.Tensor:
    """A small nonzero b_dec, so formats that subtract it before encoding really do."""
    return 0.05 * torch.randn(d_model, generator=torch.Generator().manual_seed(layer))


def saelens_cfg(layer: int, d_model: int, d_sae: int, architecture: str, **extra) -> dict:
    return {"d_in": d_model, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "architecture": architecture,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post", "sae_lens_version": "6.12.1"}, **extra}


def write_saelens(tiny_model_dir, root, architectures: dict[int, str]):
    for layer, architecture in architectures.items():
        qs = qwen_scope(tiny_model_dir, layer)
        d_sae, d_model = qs["W_enc"].shape
        folder = root / f"blocks.{layer}.hook_resid_post"
        folder.mkdir(parents=True)
        extra: dict = {"apply_b_dec_to_input": architecture == "standard"}
        tensors = {"W_enc": qs["W_enc"].T.contiguous(), "W_dec": qs["W_dec"].T.contiguous(), "b_enc": qs["b_enc"],
                   "b_dec": shifted_b_dec(d_model, layer) if architecture == "standard" else qs["b_dec"]}
        if architecture == "jumprelu":  # half the thresholds negative: the ReLU must still apply
            tensors["threshold"] = torch.where(torch.arange(d_sae) % 2 == 0, torch.tensor(-0.3), torch.tensor(0.2))
        if architecture == "topk":
            extra["k"] = 16
        (folder / "cfg.json").write_text(json.dumps(saelens_cfg(layer, d_model, d_sae, architecture, **extra)))
        save_file(tensors, str(folder / "sae_weights.safetensors"))
    return root


def write_sparsify(tiny_model_dir, root):
    for layer in LAYERS:
        qs = qwen_scope(tiny_model_dir, layer)
        d_sae, d_model = qs["W_enc"].shape
        folder = root / f"layers.{layer}"
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text(json.dumps({
            "activation": "topk", "expansion_factor": d_sae // d_model, "normalize_decoder": True, "num_latents": d_sae,
            "k": 16, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_model}))
        save_file({"encoder.weight": qs["W_enc"].contiguous(), "encoder.bias": qs["b_enc"],
                   "W_dec": qs["W_dec"].T.contiguous(), "b_dec": shifted_b_dec(d_model, layer)},
                  str(folder / "sae.safetensors"))
    return root


FORMATS = {
    "saelens-standard+jumprelu": lambda tiny, root: write_saelens(tiny, root, {1: "standard", 2: "jumprelu"}),
    "saelens-topk": lambda tiny, root: write_saelens(tiny, root, {1: "topk", 2: "topk"}),
    "sparsify": write_sparsify,
}


@pytest.fixture(scope="module", params=list(FORMATS))
def served_format(request, tiny_model_dir, tmp_path_factory):
    """(format name, server, openai client, reference) for one SAE set, served compiled."""
    from tests.hf_reference import load_reference

    work = tmp_path_factory.mktemp(request.param)
    sae_dir = FORMATS[request.param](tiny_model_dir, work / "sae")
    args = serve_args(tiny_model_dir, "--api-key", API_KEY, "--data-dir", str(work / "data"))
    args[args.index("--sae") + 1] = str(sae_dir)
    server = start_server(args, work / "server.log")
    try:
        client = openai_client(server)
        yield request.param, server, client, load_reference(tiny_model_dir, sae_dir=sae_dir)
    finally:
        server.stop()


def active(reference, layer: int) -> list[int]:
    """Features active at the last prompt position, most active first, by the format's encode."""
    stream = reference.residual_stream(reference.chat_prompt_ids(PROMPT))
    acts = reference.encode(layer, stream[layer][-1:])[0]
    return [int(i) for i in acts.argsort(descending=True) if acts[i] > 0]


def cases(reference) -> dict:
    f = lambda layer, index, mode, value=None: {"layer": layer, "index": index, "mode": mode} | (
        {} if value is None else {"value": value})
    out = {"unsteered": None}
    for layer in LAYERS:
        a = active(reference, layer)
        inactive = next(i for i in range(1000, 0, -1) if i not in a)
        out |= {
            f"L{layer}-add": {"features": [f(layer, 3, "add", 8.0)]},
            f"L{layer}-clamp": {"features": [f(layer, a[0], "clamp", 30.0), f(layer, inactive, "clamp", 15.0)]},
            f"L{layer}-scale": {"features": [f(layer, a[0], "scale", 4.0), f(layer, a[1], "scale", 0.0)]},
            f"L{layer}-ablate": {"features": [f(layer, a[0], "ablate"), f(layer, a[1], "ablate")]},
            f"L{layer}-clamp-generation": {"features": [f(layer, a[0], "clamp", 25.0)], "apply_to": "generation"},
        }
    return out


def test_every_mode_matches_the_reference(served_format):
    name, server, client, reference = served_format
    log = server.log_tail(10**7)
    assert "enforce_eager=False" in log
    assert re.search(r"saved AOT compiled function|Directly load AOT compilation", log), "not compiled"
    _, plain, _ = server_greedy(client, None)
    for case, steering in cases(reference).items():
        prompt_ids, tokens, logprobs = server_greedy(client, steering)
        features = steering["features"] if steering else None
        apply_to = steering.get("apply_to", "all") if steering else "all"
        ref_tokens, ref_logprobs = reference.greedy_generate(prompt_ids, MAX_TOKENS, features, apply_to)
        assert tokens == ref_tokens, (name, case)
        worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
        assert worst < LOGPROB_TOLERANCE and all(map(math.isfinite, logprobs)), (name, case, worst)
        if steering is not None:  # not vacuous: each case steers
            assert (tokens, logprobs) != (plain, server_greedy(client, None)[2]), (name, case)
