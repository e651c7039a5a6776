"""What `steerserve serve --sae` checks and sets in vLLM's options before the engine starts.

Steering routes each flattened row of a step by its request and position, and runs its op
between captured CUDA graph pieces; engine options that break either are refused or adjusted
here, and a local model is checked against the SAE shapes in seconds (not after the engine
has loaded it).
"""

from __future__ import annotations

import argparse
import os
import sys


def refuse_unverified_row_layouts(args: argparse.Namespace) -> None:
    """Steering routes each flattened row of a step by its request and position. Engine features
    that add rows the routing does not model, split a step's rows into pieces the op sees
    separately, or plan a step before the previous one's positions are final are refused with
    --sae until a differential test verifies them (none of them runs on vLLM's CPU build):
      * speculative decoding: draft tokens are extra rows, and the draft model's own forward
        (MTP, EAGLE) runs unsteered layers;
      * dual-batch overlap (--enable-dbo): each micro-batch is a forward over a slice of the rows;
      * asynchronous scheduling: vLLM turns it on by default on GPUs (its CPU build forces it
        off), so --sae turns it off there, and refuses an explicit --async-scheduling."""
    if getattr(args, "speculative_config", None):
        sys.exit("error: --sae cannot be combined with --speculative-config: steering of draft tokens is not "
                 "verified (drafts are extra rows per request and draft models run unsteered layers)")
    if getattr(args, "enable_dbo", False):
        sys.exit("error: --sae cannot be combined with --enable-dbo: each micro-batch would run the steering op "
                 "over a slice of the step's rows with the whole step's routing")
    if getattr(args, "async_scheduling", None):
        sys.exit("error: --sae cannot be combined with --async-scheduling: steering routes rows by positions "
                 "read while the step is prepared, which is not verified with asynchronous scheduling")
    if hasattr(args, "async_scheduling"):
        args.async_scheduling = False
        if not is_cpu_build():
            print("steerserve: SAE steering on: asynchronous scheduling turned off (not yet verified with "
                  "per-row steering)", file=sys.stderr)


def choose_model_runner() -> None:
    """The plugin hooks both of vLLM's model runners, and both run steerserve's differential
    tests (V2 on the CPU build through Triton's interpreter, tests/fixtures/triton_interpreter).
    GPU builds: vLLM's own choice (Model Runner V2 where it supports the model; V1 exists until
    0.33 and only on request, VLLM_USE_V2_MODEL_RUNNER=0). CPU build: V1 unless asked for V2, the
    faster one there (V2's Triton kernels only run interpreted; docs/vllm-versions.md has the
    numbers)."""
    requested = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if requested is not None:
        return
    from steerserve_sae.vllm_hooks.compat import has_v1_runner

    if is_cpu_build() and has_v1_runner():
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        print("steerserve: CPU build: vLLM's V1 model runner (Model Runner V2 needs Triton, which runs only "
              "interpreted here)", file=sys.stderr)


def refuse_frontends_without_the_app(args: argparse.Namespace) -> None:
    """steerserve is vLLM's FastAPI app plus its middleware and routes, and it takes --api-key out
    of vLLM's arguments to check the key itself (serve.py). vLLM's Python gRPC server (--grpc) and
    its Rust frontend (VLLM_USE_RUST_FRONTEND=1, which --grpc-port needs) serve without that app:
    no key would be checked and no steering applied, so both are refused."""
    if getattr(args, "grpc", False):
        sys.exit("error: steerserve cannot serve with --grpc: vLLM's gRPC server serves without steerserve's app, "
                 "so no API key would be checked and no steering applied")
    if _vllm_env("VLLM_USE_RUST_FRONTEND"):
        sys.exit("error: steerserve cannot serve with VLLM_USE_RUST_FRONTEND=1: vLLM's Rust frontend serves without "
                 "steerserve's app, so no API key would be checked and no steering applied; unset it")


def refuse_model_runner_overrides(args: argparse.Namespace) -> None:
    """vLLM switches to Model Runner V2 whatever VLLM_USE_V2_MODEL_RUNNER says when a watermark
    is configured (VllmConfig.use_v2_model_runner), so steering would not run on the runner
    choose_model_runner chose; refused unless V2 was asked for."""
    if getattr(args, "watermark_config", None) is not None and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0":
        sys.exit("error: --watermark-config cannot be combined with --sae or --steering-layers on vLLM's V1 model "
                 "runner: watermarking makes vLLM switch to Model Runner V2; set VLLM_USE_V2_MODEL_RUNNER=1 to steer "
                 "on V2 or drop --watermark-config")


def keep_steering_out_of_cuda_graphs(args: argparse.Namespace) -> None:
    """The steering op reads per-step routing in Python, so it must run between captured CUDA
    graph pieces (it is registered as a splitting op), never inside a captured graph. Besides the
    graph mode, three things would capture it: breakable CUDA graphs (captured eagerly, broken
    only at ops vLLM marks, which vLLM turns on by itself for some architectures and with
    VLLM_BATCH_INVARIANT=1 on bf16 CUDA unless the variable is set: set to 0 here), attention +
    quant fusion (empties the splitting ops and turns graphs FULL), and a splitting_ops list
    without the steering op (it replaces vLLM's list, which holds it)."""
    from vllm.config.compilation import CUDAGraphMode

    from steerserve_sae.backends.op import OP_NAME

    if os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH") is not None and _vllm_env("VLLM_USE_BREAKABLE_CUDAGRAPH"):
        sys.exit("error: VLLM_USE_BREAKABLE_CUDAGRAPH=1 would capture the steering op inside a CUDA graph and freeze "
                 "its per-request routing; unset it with --sae")
    if "VLLM_USE_BREAKABLE_CUDAGRAPH" not in os.environ:
        os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "0"  # keeps vLLM from turning it on by itself
        if _vllm_env("VLLM_BATCH_INVARIANT"):
            print("steerserve: SAE steering on: VLLM_USE_BREAKABLE_CUDAGRAPH=0, which VLLM_BATCH_INVARIANT=1 would "
                  "turn on (breakable graphs capture the steering op)", file=sys.stderr)
    compilation = args.compilation_config
    if compilation.pass_config.fuse_attn_quant:
        sys.exit("error: fuse_attn_quant (in --compilation-config's pass_config) cannot be combined with --sae: it "
                 "removes the graph splitting ops, so the steering op would be captured inside a CUDA graph")
    compilation.pass_config.fuse_attn_quant = False  # vLLM's optimization levels may default it on
    if compilation.splitting_ops is not None and OP_NAME not in compilation.splitting_ops:
        sys.exit(f"error: splitting_ops in --compilation-config replaces vLLM's list, which holds the steering op; "
                 f"add {OP_NAME!r} to it (or leave splitting_ops unset) with --sae")
    mode = compilation.cudagraph_mode
    if mode is None:
        args.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
        print("steerserve: SAE steering on: CUDA graphs set to PIECEWISE (the steering op runs between "
              "captured pieces; full-model graphs would freeze its per-step routing)", file=sys.stderr)
    elif mode not in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        sys.exit(f"error: cudagraph_mode {mode.name} would capture the steering op inside a CUDA graph and "
                 "freeze its per-request routing; use PIECEWISE or NONE with --sae")


def explain_tensor_parallel_fusion(args: argparse.Namespace) -> None:
    """The SAE step needs the whole residual stream at a steered layer's output. This vLLM has
    no sequence-parallel compile pass (only MoE sequence parallelism, for MoE models), and its
    all-reduce + RMSNorm fusion matches an all-reduce followed by the next layer's fused
    add-norm inside one graph piece: the steering op is a splitting op between the two, so at
    steered layers the all-reduce stays a plain all-reduce and the stream is whole, while the
    other layers keep the fusion. Said once at start-up, so nobody has to wonder."""
    if getattr(args, "tensor_parallel_size", 1) <= 1:
        return
    print("steerserve: tensor parallel: the all-reduce + RMSNorm fusion stays on except at steered layers, "
          "where the steering op splits the graph so the residual stream it edits is whole on every rank",
          file=sys.stderr)


def preflight_local_model(model: str, sae_dir: str | None, layers: list[int], *, name: str | None, k: int | None,
                          vector_layers: list[int] = ()) -> None:
    """Fail in seconds, not after the engine starts, when a local model cannot be steered.

    Only for a model given as a local directory (a hub id is checked by the workers on load):
    the architecture must be supported, the SAE and --steering-layers layers must exist, and
    each SAE's shapes must fit the hidden size. The SAE files are opened memory-mapped onto the
    meta device, so no weights are read.
    """
    import json
    from pathlib import Path

    import torch

    from steerserve_sae.vllm_hooks.architectures import ARCHITECTURES
    from steerserve_sae.sae.loading import SAELoadError, load_sae_layer

    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    supported = [ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES]
    if not supported:
        sys.exit(
            f"error: {model}: SAE steering does not support the architecture {architectures}; "
            f"supported architectures: {', '.join(sorted(ARCHITECTURES))}"
        )
    num_layers = supported[0].num_layers(config)
    for option, wanted in (("--sae-layers", layers), ("--steering-layers", vector_layers)):
        outside = [n for n in wanted if num_layers is not None and not 0 <= n < num_layers]
        if outside:
            sys.exit(f"error: {option} {outside}: {model} has {num_layers} decoder layers (0..{num_layers - 1})")
    d_model = supported[0].hidden_size(config)
    if d_model is None or sae_dir is None:
        return
    for layer in layers:
        try:
            load_sae_layer(sae_dir, layer, d_model=int(d_model), dtype=torch.float32, device="meta", name=name, k=k)
        except SAELoadError as exc:
            sys.exit(f"error: {exc}")


def _vllm_env(name: str) -> bool:
    """A vLLM switch read as vLLM reads it (vllm/envs.py); a value vLLM cannot read is an error."""
    import vllm.envs as envs

    try:
        return bool(getattr(envs, name))
    except ValueError:
        sys.exit(f"error: {name}={os.environ.get(name)!r}: vLLM reads it as a number (0 or 1)")


def is_cpu_build() -> bool:
    """CPU builds of vLLM guess the platform from their version string; make it explicit."""
    from steerserve_sae.vllm_hooks.compat import installed_build

    return installed_build() == "cpu"
