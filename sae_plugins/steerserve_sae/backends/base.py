"""The steering backend interface: one typed view of a layer's buffers, one `apply`.

Three backends implement the same edit (what sae_math.py and activations.py define): the
PyTorch reference (torch_reference.py), the native CPU kernel (native_cpu.py) and the Triton
kernels for GPUs (triton.py); `select_backend` in __init__.py picks one. Adding a backend is
one new file with a SteeringBackend subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.steering.step_plan import LayerPlan


@dataclass(frozen=True, eq=False)
class LayerBuffers:
    """One steered layer's views of the runtime's fixed buffers, and its SAE; made once."""

    layer: int
    sae: SAEWeights | None  # None at a layer steered by direction vectors only (no encode, no decode)
    routing: torch.Tensor  # [6, max_rows] int64, rows step_plan.STEER_ROWS .. VECTOR_SLOTS
    plan_counts: torch.Tensor  # [6] int64: the live LayerPlan
    add_vectors: torch.Tensor  # [slots, d_model] float32
    feature_ids: torch.Tensor  # [slots, max_features] int64
    coefficients: torch.Tensor  # [slots, max_features, 2] float32 (offset, gain)
    edit_gates: torch.Tensor  # [slots, max_features] int64: gate column of each entry
    gate_ids: torch.Tensor  # [slots, max_features] int64: per gate column, its feature here (-1: none)
    gate_bounds: torch.Tensor  # [slots, max_features, 2] float32 (above, below)
    gate_state: torch.Tensor  # [max_rows, max_features + 1] float32, shared by every layer
    vector_pool: torch.Tensor  # [slots * max_vectors, d_model] float32, shared by every layer
    vector_ids: torch.Tensor  # [slots, max_vectors] int64: pool row of each vector entry
    vector_rules: torch.Tensor  # [slots, max_vectors, 3] float32 (offset, gain, upper): vector_math.py
    vector_gates: torch.Tensor  # [slots, max_vectors] int64: gate column of each vector entry


class SteeringBackend(ABC):
    name: str

    def prepare(self, layer: LayerBuffers) -> None:
        """Once per layer at start-up (e.g. repack the encoder)."""

    @abstractmethod
    def apply(self, layer: LayerBuffers, plan: LayerPlan | None, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Edit `hidden` in place for this step's routed rows. `plan` is the host copy of
        `layer.plan_counts` (None: nothing planned); backends that read the device counts
        ignore it, so their calls do not depend on this step's requests."""


class KernelBackend(SteeringBackend):
    """A backend whose kernel reads everything, live counts included, from the buffers: the
    same arguments every step, made once per layer (kernel_arguments). At a layer without an
    SAE (vectors only) the kernels, which take an SAE, are not called: the PyTorch edit is,
    which there is a few dot products and adds per row (`vectors_only`)."""

    def __init__(self) -> None:
        self._arguments: dict[int, tuple] = {}

    def prepare(self, layer: LayerBuffers) -> None:
        if layer.sae is not None:
            self._arguments[layer.layer] = kernel_arguments(layer)

    def apply(self, layer: LayerBuffers, plan: LayerPlan | None, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        if layer.sae is None:
            self.vectors_only(layer, plan, hidden, residual)
            return
        self.launch(hidden, residual, *self._arguments[layer.layer])

    @staticmethod
    def vectors_only(layer: LayerBuffers, plan: LayerPlan | None, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        from steerserve_sae.backends.torch_reference import edit_rows  # it imports this module

        edit_rows(layer, plan, hidden, residual)

    @abstractmethod
    def launch(self, hidden: torch.Tensor, residual: torch.Tensor, *arguments) -> None:
        """The kernel, called with kernel_arguments' tuple after (hidden, residual)."""


def kernel_arguments(layer: LayerBuffers) -> tuple:
    """The arguments after (hidden, residual) of the native op and the Triton launcher, in the
    form the reference computes with: the op's schema in kernels/steer_rows_cpu.cpp."""
    sae = layer.sae
    W_enc, b_enc = sae.encoder()
    return (
        layer.routing, layer.plan_counts, layer.add_vectors, layer.feature_ids, layer.coefficients,
        layer.edit_gates, layer.gate_ids, layer.gate_bounds, layer.gate_state, layer.vector_pool, layer.vector_ids,
        layer.vector_rules, layer.vector_gates, W_enc, sae.encoder_panels, b_enc, sae.b_dec.float() if sae.apply_b_dec_to_input else None,
        sae.W_dec.contiguous(), sae.threshold.float() if sae.activation == "jumprelu" else None,
        sae.k if sae.activation == "topk" else 0,
    )
