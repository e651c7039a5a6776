"""The SAE steering step alone, at Qwen-Scope 27B shapes, against the model's own MLP.

Prints, per row count, the time of the steering step (the same `SteeringRuntime.apply` the
server runs) for clamp rows (full TopK encode + touched-feature decode), add-only rows, and
unsteered rows (routing only), each as a ratio to the Qwen3.5-27B MLP (gate/up + down matmuls)
on the same rows, measured in one run. On CPU the widths are divided by --shrink (default 8),
the op is the native kernel, and the plain-PyTorch op's clamp is timed beside it; on CUDA the
full size runs (d_model 5120, d_sae 81920, MLP 17408, bf16).

    python bench/sae_step.py [--device cuda] [--shrink 1] [--rows 1,8,64,256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from steerserve_sae.protocol.plugin_config import PluginConfig  # noqa: E402
from steerserve_sae.sae.autoencoder import SAEWeights  # noqa: E402
from steerserve_sae.steering.runtime import StepBatch, SteeringRuntime  # noqa: E402
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY  # noqa: E402
from steerserve_sae.protocol.spec import FeatureEdit, SteeringSpec  # noqa: E402

D_MODEL, D_SAE, D_MLP, K = 5120, 81920, 17408, 50


def random_sae(d_model: int, d_sae: int, k: int, device, dtype) -> SAEWeights:
    g = torch.Generator(device="cpu").manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_model, generator=g), dim=-1)
    return SAEWeights(
        layer=0, W_enc=w_dec.to(device, dtype), b_enc=torch.zeros(d_sae, device=device, dtype=dtype),
        W_dec=w_dec.to(device, dtype), b_dec=torch.zeros(d_model, device=device, dtype=dtype),
        activation="topk", k=k, threshold=None, apply_b_dec_to_input=False, architecture="bench", source="random",
    )


def timed(fn, device, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", type=int, default=None, help="divide all widths (default: 1 on cuda, 8 on cpu)")
    parser.add_argument("--rows", default="1,8,64,256")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    shrink = args.shrink or (1 if device.type == "cuda" else 8)
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    dtype = torch.bfloat16
    d_model, d_sae, d_mlp = D_MODEL // shrink, D_SAE // shrink, D_MLP // shrink
    sae = random_sae(d_model, d_sae, K, device, dtype)
    if device.type == "cpu":
        sae.choose_cpu_encoder()  # as the server's CPU workers do (runner_patch.install_steering)
    gate_up = torch.randn(2 * d_mlp, d_model, device=device, dtype=dtype) * 0.01
    down = torch.randn(d_model, d_mlp, device=device, dtype=dtype) * 0.01
    print(f"device={device} dtype=bf16 d_model={d_model} d_sae={d_sae} k={K} mlp={d_mlp} (1/{shrink} of 27B)")
    on_cpu = device.type == "cpu"
    print(f"{'rows':>5} {'mlp ms':>8} {'clamp ms':>9} {'add ms':>7} {'route ms':>9} "
          f"{'clamp/mlp':>10} {'add/mlp':>8} {'route/mlp':>10}" + (f" {'torch clamp/native':>19}" if on_cpu else ""))
    specs = {
        "clamp": SteeringSpec.create([FeatureEdit(0, 7, "clamp", 5.0)]),
        "add": SteeringSpec.create([FeatureEdit(0, 7, "add", 5.0)]),
    }
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, d_model, device=device, dtype=dtype)
        residual = torch.randn(rows, d_model, device=device, dtype=dtype)

        def mlp():
            h = x @ gate_up.T
            gate, up = h.chunk(2, dim=-1)
            return (torch.nn.functional.silu(gate) * up) @ down.T

        results = {"mlp": timed(mlp, device, repeats)}
        cases = [(name, spec, "auto") for name, spec in [*specs.items(), ("route", None)]]
        if on_cpu:
            cases.append(("torch clamp", specs["clamp"], "torch"))
        for name, spec, kernel in cases:
            runtime = SteeringRuntime(PluginConfig("bench", (0,), steering_kernel=kernel), {0: sae}, device)
            extra = {EXTRA_ARGS_KEY: spec.to_extra_arg()} if spec else {}
            one = np.array([rows])  # one request, all its rows prompt rows
            runtime.begin_step(StepBatch(["r"], one, np.array([0]), one, {"r": extra}.get))
            hidden = x.clone()
            results[name] = timed(lambda: runtime.apply(0, hidden, residual), device, repeats)
        m = results["mlp"]
        print(f"{rows:>5} {m:>8.3f} {results['clamp']:>9.3f} {results['add']:>7.3f} {results['route']:>9.3f} "
              f"{results['clamp'] / m:>10.2f} {results['add'] / m:>8.3f} {results['route'] / m:>10.3f}"
              + (f" {results['torch clamp'] / results['clamp']:>19.2f}" if on_cpu else ""))


if __name__ == "__main__":
    main()
