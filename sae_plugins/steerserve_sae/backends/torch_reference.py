"""The steering edit in plain PyTorch: the reference the kernels are tested against, and the
GPU default (it slices by the plan's host-side counts, which is safe because the steering op
runs between captured CUDA graph pieces, and needs no device-to-host synchronisation)."""

from __future__ import annotations

import torch

from steerserve_sae.steering import gating, vector_math
from steerserve_sae.sae import sae_math
from steerserve_sae.capture.features import ENCODE_CHUNK_ROWS
from steerserve_sae.steering.step_plan import LayerPlan
from steerserve_sae.backends.base import LayerBuffers, SteeringBackend


class TorchSteering(SteeringBackend):
    name = "torch"

    def apply(self, layer: LayerBuffers, plan: LayerPlan | None, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        edit_rows(layer, plan, hidden, residual)


def edit_rows(layer: LayerBuffers, plan: LayerPlan | None, hidden: torch.Tensor, residual: torch.Tensor) -> None:
    """The edit of this step's routed rows at one layer. At a layer without an SAE nothing is
    ever routed to encode (the API admits no feature or gate probe there), so only the vector
    edits and the add vector run."""
    if plan is None:
        return
    steer_rows, steer_slots, encode_rows, encode_slots, vector_rows, vector_slots = layer.routing.unbind(0)
    width, gate_width = plan.width, plan.gate_width
    if plan.num_vectored:  # projections of the stream as it arrived, before any edit here
        rows, slots = vector_rows[: plan.num_vectored], vector_slots[: plan.num_vectored]
        directions = layer.vector_pool[layer.vector_ids.index_select(0, slots)[:, : plan.vector_width]]
        x = hidden.index_select(0, rows).float() + residual.index_select(0, rows)
        vector_coef = vector_math.projected_coefficients(
            x, directions, layer.vector_rules.index_select(0, slots)[:, : plan.vector_width])
    # Every edit and gate at a layer reads the stream as it arrived there; chunks bound the
    # workspace (pre-activations [rows, d_sae] and decoder rows [rows, width, d_model]).
    for lo in range(0, plan.num_encoded, ENCODE_CHUNK_ROWS):
        hi = min(plan.num_encoded, lo + ENCODE_CHUNK_ROWS)
        rows, slots = encode_rows[lo:hi], encode_slots[lo:hi]
        h = hidden.index_select(0, rows).float()
        ids = layer.feature_ids.index_select(0, slots)[:, :width]
        probes = layer.gate_ids.index_select(0, slots)[:, :gate_width]
        acts = sae_math.feature_activations(
            layer.sae, h + residual.index_select(0, rows), torch.cat([ids, probes.clamp(min=0)], dim=1))
        state = layer.gate_state.index_select(0, rows)
        if gate_width:
            fresh = gating.passes(acts[:, width:], layer.gate_bounds.index_select(0, slots)[:, :gate_width])
            state[:, :gate_width] = torch.where(probes >= 0, fresh, state[:, :gate_width])
            layer.gate_state.index_copy_(0, rows, state)
        if not width:
            continue
        offset, gain = layer.coefficients.index_select(0, slots)[:, :width].unbind(-1)
        gate = state.gather(1, layer.edit_gates.index_select(0, slots)[:, :width])
        delta = sae_math.decode_edits(layer.sae, ids, torch.addcmul(offset, gain, acts[:, :width]) * gate)
        # Encoded rows are distinct, so write them back (one rounding) rather than add.
        hidden.index_copy_(0, rows, h.add_(delta).to(hidden.dtype))
    if plan.num_vectored:  # after the encoded edits, which wrote the gates probed here
        rows, slots = vector_rows[: plan.num_vectored], vector_slots[: plan.num_vectored]
        gate = layer.gate_state.index_select(0, rows).gather(
            1, layer.vector_gates.index_select(0, slots)[:, : plan.vector_width])
        delta = torch.bmm((vector_coef * gate).unsqueeze(1), directions).squeeze(1)
        hidden.index_copy_(0, rows, hidden.index_select(0, rows).float().add_(delta).to(hidden.dtype))
    if plan.num_steered:
        rows, slots = steer_rows[: plan.num_steered], steer_slots[: plan.num_steered]
        hidden.index_add_(0, rows, layer.add_vectors.index_select(0, slots).to(hidden.dtype))
