"""Hooks into vLLM's model runners (V1 and Model Runner V2): install steering after load,
route tokens each step.

Each runner gets four hooks, placed where its own step structure allows:
  * finished requests: every real `execute_model` first frees the slots of the requests the
    scheduler reports finished (also on steps that schedule no tokens and return early);
  * routing: once this step's row order is known and before the forward, `begin_step` maps the
    scheduled requests to config slots (V1: before `_prepare_inputs`, after the persistent batch
    is updated; V2: after `prepare_inputs`, from the `InputBatch` it returns);
  * dummy runs (profiling, warm-up, compile, graph capture) clear the routing, so no stale slot
    ever steers a dummy batch and padding rows are never steered;
  * after the forward, `end_step` checks the op ran at every planned layer, so a replayed full
    CUDA graph fails the step loudly instead of sampling unsteered tokens, and counts gated
    tokens for the requests that asked.
V2 keeps no per-request sampling params on the runner, so its `add_requests` hook keeps each
new request's `extra_args` until the request finishes.
"""

from __future__ import annotations

import functools
import time
import logging

from tqdm import tqdm

from steerserve_sae.steering import registry
from steerserve_sae.vllm_hooks.architectures import architecture, check_steerable_layer
from steerserve_sae.capture.logit_lens import FeatureLens
from steerserve_sae.vllm_hooks.model_patch import is_local_layer, steer_layer
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.sae.loading import load_sae_layer
from steerserve_sae.backends.op import register_steering_op
from steerserve_sae.steering.runtime import StepBatch, SteeringRuntime
from steerserve_sae.vllm_hooks.compat import V1_RUNNER_MODULE, VLLMCompatibilityError, has_v1_runner, require

# A child of vLLM's logger, so our lines go out through the handler vLLM configures.
logger = logging.getLogger("vllm.steerserve")


def install_steering(runner) -> None:
    """Load the SAEs and patch the steered layers of `runner.model` (no-op without --sae or
    --steering-layers)."""
    config = PluginConfig.from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return
    model_config = runner.vllm_config.model_config
    arch = architecture(model_config.architectures[0])
    layers = arch.decoder_layers_of(runner.model)
    d_model = model_config.hf_text_config.hidden_size
    for option, wanted in (("--sae-layers", config.sae_layers), ("--steering-layers", config.steering_layers)):
        missing = [n for n in wanted if not 0 <= n < len(layers)]
        if missing:
            raise ValueError(f"{option} {missing}: the model has only {len(layers)} decoder layers "
                             f"(0..{len(layers) - 1})")
    local = [n for n in config.sae_layers if is_local_layer(layers[n])]
    vector_only = tuple(n for n in config.vector_only_layers if is_local_layer(layers[n]))
    for n in sorted({*local, *vector_only}):
        check_steerable_layer(layers[n], n)
    saes = {}
    for n in tqdm(local, desc=f"Loading SAEs from {config.sae_path}", unit="layer", disable=not local):
        saes[n] = load_sae_layer(
            config.sae_path, n, d_model=d_model, dtype=model_config.dtype, device=runner.device,
            name=config.sae_name, k=config.sae_k,
        )
        if runner.device.type == "cpu":
            saes[n].choose_cpu_encoder()
    register_steering_op()
    max_rows = runner.vllm_config.scheduler_config.max_num_batched_tokens
    runtime = SteeringRuntime(config, saes, runner.device, max_rows=max_rows, vector_layers=vector_only,
                              d_model=d_model)
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    runtime.captures.answers_dashboards = get_tensor_model_parallel_rank() == 0
    registry.install(runtime, FeatureLens(runner.model, arch, saes))
    for n in sorted({*local, *vector_only}):
        steer_layer(layers[n], n)
    total = sum(s.nbytes() for s in saes.values())
    logger.info(
        "steerserve: SAE steering on layers %s, direction vectors only on layers %s (SAEs %.1f MiB; %d config "
        "slots for %d distinct specs per API "
        "process, tables and routing %.1f MiB; workspace up to %.1f MiB, reserved in the memory profile; "
        "results kept for the API up to %d MiB of host memory, outside the profile (--max-worker-store-mib); "
        "steering op: %s)",
        local, list(vector_only), total / 2**20, runtime.slots.num_slots, config.max_configs,
        runtime.table_bytes() / 2**20, runtime.workspace_bytes() / 2**20, config.max_store_mib, runtime.kernel_name,
    )


def begin_step(runner, scheduler_output, num_scheduled_tokens) -> None:
    """V1: the persistent batch's arrays are already in this step's row order."""
    runtime = registry.runtime()
    if runtime is None:
        return
    batch = runner.input_batch
    n = batch.num_reqs

    def extra_args_of(req_id: str) -> dict | None:
        params = runner.requests[req_id].sampling_params
        return params.extra_args if params is not None else None

    runtime.begin_step(
        StepBatch(
            batch.req_ids,
            num_scheduled_tokens[:n],
            batch.num_computed_tokens_cpu[:n],
            batch.num_prompt_tokens[:n],
            extra_args_of,
        ),
    )


def _v2_extra_args(runner) -> dict:
    """The V2 runner's `extra_args` per live request (kept by its add_requests hook)."""
    return runner.__dict__.setdefault("_steerserve_extra_args", {})


def _begin_step_v2(runner, scheduler_output, input_batch) -> None:
    runtime = registry.runtime()
    if runtime is None:
        return
    extra_args = _v2_extra_args(runner)
    runtime.begin_step(
        StepBatch(
            input_batch.req_ids,
            input_batch.num_scheduled_tokens,
            input_batch.num_computed_tokens_np,
            runner.req_states.prompt_len.np[input_batch.idx_mapping_np],
            extra_args.get,
        ),
    )


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


def _clearing_routing_first(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        runtime = registry.runtime()
        if runtime is not None:
            runtime.clear_step()
        output = method(self, *args, **kwargs)
        if runtime is not None and kwargs.get("is_profile"):
            runtime.reserve_workspace()  # inside profile_run: its peak counts (see the runtime)
        return output

    return wrapper


def _ending_step_afterwards(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        output = method(self, *args, **kwargs)
        runtime = registry.runtime()
        if runtime is not None:
            runtime.end_step()
        return output

    return wrapper


def _finishing_requests_first(method):
    """Every real step reports the requests that finished since the last one; some steps
    schedule no tokens and return before any other hook (see SteeringRuntime.finish_requests)."""
    @functools.wraps(method)
    def wrapper(self, scheduler_output, *args, **kwargs):
        runtime = registry.runtime()
        if runtime is not None and not kwargs.get("dummy_run"):
            finished = scheduler_output.finished_req_ids
            runtime.finish_requests(finished)
            extra_args = self.__dict__.get("_steerserve_extra_args")  # V2's store (_v2_extra_args)
            for req_id in finished if extra_args else ():
                extra_args.pop(req_id, None)
        return method(self, scheduler_output, *args, **kwargs)

    return wrapper


def _timed(method):
    """Adds the host time of real (non-dummy) steps to the runtime's execute_seconds, the
    denominator of the steering share that bench/steering_overhead.py reports."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        runtime = registry.runtime()
        if runtime is None or kwargs.get("dummy_run"):
            return method(self, *args, **kwargs)
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            runtime.execute_seconds += time.perf_counter() - started

    return wrapper


def patch_model_runners() -> None:
    """Idempotent: hook both model runners (vLLM picks one per engine). V1 only where the release
    still has it (0.34.0 removed it, and asking for it there is an error of vLLM's own)."""
    if has_v1_runner():
        _patch_v1_runner()
    _patch_v2_runner()


def _patch_v1_runner() -> None:
    """The GPU runner (which the V1 CPU runner subclasses) and the CPU loader."""
    GPUModelRunner = require(V1_RUNNER_MODULE, "GPUModelRunner")
    for method in ("_prepare_inputs", "_dummy_run", "_model_forward", "execute_model", "load_model"):
        require(V1_RUNNER_MODULE, f"GPUModelRunner.{method}")
    if getattr(GPUModelRunner._prepare_inputs, "_steerserve", False):
        return
    prepare_inputs = GPUModelRunner._prepare_inputs

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        begin_step(self, scheduler_output, num_scheduled_tokens)
        return prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    _prepare_inputs._steerserve = True
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._dummy_run = _clearing_routing_first(GPUModelRunner._dummy_run)
    GPUModelRunner._model_forward = _ending_step_afterwards(GPUModelRunner._model_forward)
    GPUModelRunner.execute_model = _timed(_finishing_requests_first(GPUModelRunner.execute_model))
    _wrap_load_model(GPUModelRunner)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _wrap_load_model(require("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"))


def _patch_v2_runner() -> None:
    """Model Runner V2 (vllm/v1/worker/gpu/; its CPU runner subclasses it and keeps its loader)."""
    refuse_standalone_cpu_runner()
    GPUModelRunner = require("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
    for method in ("add_requests", "prepare_inputs", "execute_model", "load_model"):
        require("vllm.v1.worker.gpu.model_runner", f"GPUModelRunner.{method}")
    if getattr(GPUModelRunner.prepare_inputs, "_steerserve", False):
        return
    add_requests, prepare_inputs = GPUModelRunner.add_requests, GPUModelRunner.prepare_inputs

    @functools.wraps(add_requests)
    def _add_requests(self, scheduler_output, *args, **kwargs):
        if registry.runtime() is not None:
            store = _v2_extra_args(self)
            for new in scheduler_output.scheduled_new_reqs:
                params = new.sampling_params
                store[new.req_id] = params.extra_args if params is not None else None
        return add_requests(self, scheduler_output, *args, **kwargs)

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        input_batch = prepare_inputs(self, scheduler_output, *args, **kwargs)
        _begin_step_v2(self, scheduler_output, input_batch)
        return input_batch

    _prepare_inputs._steerserve = True
    GPUModelRunner.add_requests = _add_requests
    GPUModelRunner.prepare_inputs = _prepare_inputs
    # Dummy runs go through execute_model too; a real batch sets the routing in prepare_inputs.
    GPUModelRunner.execute_model = _timed(_finishing_requests_first(
        _ending_step_afterwards(_clearing_routing_first(GPUModelRunner.execute_model))))
    _wrap_load_model(GPUModelRunner)


def refuse_standalone_cpu_runner() -> None:
    """vLLM 0.34 runs V2 on CPUs without Triton that are not x86 through StandaloneCPUModelRunner,
    which does not subclass the V2 GPU runner: none of these hooks would run there, and requests
    would be served unsteered. Refused loudly instead."""
    from vllm.platforms import current_platform

    uses_standalone = getattr(current_platform, "uses_standalone_cpu_model_runner", None)
    if uses_standalone is not None and uses_standalone():
        raise VLLMCompatibilityError(
            "steerserve: this CPU runs vLLM's StandaloneCPUModelRunner (no Triton, not x86), which steerserve's "
            "runner hooks do not cover; steering would silently not apply")
