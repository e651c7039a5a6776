"""The steering step as a registered custom op, so torch.compile keeps it in the graph.

vLLM compiles the model once; Python state read during tracing is frozen into the graph (a
patched forward that branches on "is anyone steered?" silently stops working). A custom op is
opaque to the compiler and runs on every forward, so the current step's routing is always read.
Under CUDA graphs it is a splitting op (see `register_as_splitting_op`), run between captured
pieces, and runner_patch.py checks after every forward that it really ran where planned.
The op edits the layer's output `hidden` in place: the residual stream after the layer is
`hidden + residual`, and adding the edit to `hidden` edits that sum.
"""

import torch

from steerserve_sae.steering import registry


def _steer_residual(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    runtime = registry.runtime()
    if runtime is not None:
        runtime.apply(layer, hidden, residual)


def _steer_residual_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


OP_NAME = "steerserve::steer_residual"


def register_as_splitting_op() -> None:
    """Keep the op out of captured CUDA graphs: vLLM splits its compiled graph at these ops
    (as it does for attention) and runs them eagerly between the captured pieces, so the op's
    per-step Python routing is read on every step. Idempotent; must run before vLLM builds
    its config (general plugins do)."""
    from vllm.config.compilation import CompilationConfig

    if OP_NAME not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(OP_NAME)


def register_steering_op() -> None:
    """Register `torch.ops.steerserve.steer_residual` once per process (idempotent)."""
    if hasattr(torch.ops, "steerserve") and hasattr(torch.ops.steerserve, "steer_residual"):
        return
    from torch.library import Library

    from vllm.utils.torch_utils import direct_register_custom_op

    global _library
    _library = Library("steerserve", "FRAGMENT")
    direct_register_custom_op(
        op_name="steer_residual",
        op_func=_steer_residual,
        mutates_args=["hidden"],
        fake_impl=_steer_residual_fake,
        target_lib=_library,
    )
