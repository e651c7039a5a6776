"""Steering backends (base.py) and the one function that picks one (`--steering-kernel`)."""

from __future__ import annotations

import torch

from steerserve_sae.backends.base import LayerBuffers, SteeringBackend, kernel_arguments
from steerserve_sae.backends.torch_reference import TorchSteering

__all__ = ["LayerBuffers", "SteeringBackend", "kernel_arguments", "select_backend"]


def select_backend(choice: str, device: torch.device, max_rows: int, max_features: int) -> SteeringBackend:
    """auto/native: the native CPU kernel on CPU (auto falls back to PyTorch, logging why, when
    it cannot be built); torch: the reference; triton: the experimental GPU kernels."""
    if choice == "triton":
        from steerserve_sae.backends.triton import TritonSteering, runs_on

        if not runs_on(device):
            raise ValueError(f"--steering-kernel triton needs a CUDA device, not {device}")
        return TritonSteering(max_rows, max_features, device)
    from steerserve_sae.backends.native_cpu import native_backend

    return native_backend(choice, device) or TorchSteering()
