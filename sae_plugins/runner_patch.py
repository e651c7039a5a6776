"""Hooks into vLLM's V1 model runner: install steering after load, route tokens each step.

`_prepare_inputs` runs after the persistent batch is updated (so `input_batch.req_ids` is this
step's row order) and before the forward; the routing is written there. `_dummy_run` (profiling,
warm-up, compile) clears it so no stale slot ever steers a dummy batch. `_model_forward` checks
afterwards that the op ran at every planned layer, so a replayed CUDA graph fails loudly.
"""

from __future__ import annotations

import functools
import logging

from tqdm import tqdm

from .feature_lens import FeatureLens
from .model_patch import decoder_layers, is_local_layer, steer_layer
from .plugin_config import PluginConfig
from .sae_loading import load_sae_layer
from .steering_op import register_steering_op, set_runtime_lookup
from .steering_runtime import RequestView, SteeringRuntime

logger = logging.getLogger("steerserve")

_runtime: SteeringRuntime | None = None
_lens: FeatureLens | None = None


def current_runtime() -> SteeringRuntime | None:
    return _runtime


def current_lens() -> FeatureLens | None:
    return _lens


def install_steering(runner) -> None:
    """Load the SAEs and patch the steered layers of `runner.model` (no-op without --sae)."""
    global _runtime, _lens
    config = PluginConfig.from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return
    model_config = runner.vllm_config.model_config
    architecture = model_config.architectures[0]
    layers = decoder_layers(runner.model, architecture)
    d_model = model_config.hf_text_config.hidden_size
    local = [n for n in config.sae_layers if n < len(layers) and is_local_layer(layers[n])]
    missing = [n for n in config.sae_layers if n >= len(layers)]
    if missing:
        raise ValueError(f"--sae-layers {missing}: the model has only {len(layers)} decoder layers")
    saes = {}
    for n in tqdm(local, desc=f"Loading SAEs from {config.sae_path}", unit="layer"):
        saes[n] = load_sae_layer(
            config.sae_path, n, d_model=d_model, dtype=model_config.dtype, device=runner.device
        )
    register_steering_op()
    _runtime = SteeringRuntime(config, saes, runner.device)
    set_runtime_lookup(current_runtime)
    _lens = FeatureLens(runner.model, architecture, saes)
    for n in local:
        steer_layer(layers[n], n)
    total = sum(s.nbytes() for s in saes.values())
    logger.info("steerserve: SAE steering on layers %s (%.1f MiB)", local, total / 2**20)


def begin_step(runner, scheduler_output, num_scheduled_tokens) -> None:
    if _runtime is None:
        return
    batch = runner.input_batch
    requests = []
    for i, req_id in enumerate(batch.req_ids):
        state = runner.requests[req_id]
        params = state.sampling_params
        requests.append(
            RequestView(
                req_id=req_id,
                extra_args=params.extra_args if params is not None else None,
                num_scheduled=int(num_scheduled_tokens[i]),
                num_computed=int(batch.num_computed_tokens_cpu[i]),
                num_prompt=state.num_prompt_tokens,
            )
        )
    _runtime.begin_step(scheduler_output.finished_req_ids, requests)


def _wrap_load_model(cls) -> None:
    original = cls.load_model
    if getattr(original, "_steerserve", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        install_steering(self)

    load_model._steerserve = True
    cls.load_model = load_model


def patch_model_runners() -> None:
    """Idempotent: wrap the GPU runner (which the CPU runner subclasses) and the CPU loader."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._prepare_inputs, "_steerserve", False):
        return
    prepare_inputs = GPUModelRunner._prepare_inputs
    dummy_run = GPUModelRunner._dummy_run
    model_forward = GPUModelRunner._model_forward

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        begin_step(self, scheduler_output, num_scheduled_tokens)
        return prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    @functools.wraps(dummy_run)
    def _dummy_run(self, *args, **kwargs):
        if _runtime is not None:
            _runtime.clear_step()
        return dummy_run(self, *args, **kwargs)

    @functools.wraps(model_forward)
    def _model_forward(self, *args, **kwargs):
        output = model_forward(self, *args, **kwargs)
        if _runtime is not None:
            _runtime.verify_applied()
        return output

    _prepare_inputs._steerserve = True
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._dummy_run = _dummy_run
    GPUModelRunner._model_forward = _model_forward
    _wrap_load_model(GPUModelRunner)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap_load_model(CPUModelRunner)
