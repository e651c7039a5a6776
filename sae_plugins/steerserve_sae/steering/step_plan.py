"""This step's work per steered layer, in fixed device buffers (like LoRA's kernel metadata).

Built on the host, where the scheduler's data already is, from each row's config slot and the
slot tables' host mirrors: per layer the rows with an `add` vector and their slots, the rows
that need an encode and their slots, the rows with projected vector edits (vector_math.py) and
their slots, and the live counts of these plus the widths of the feature table, the gate
probes and the vector table in use. One host-to-device copy writes it into `routing`
[layers, 6, max_rows] and `plan_counts` [layers, 6] (the counts as a tensor: the native and
Triton backends read them there, so their calls never depend on this step's requests). A
decode step usually routes exactly like the previous one; then the buffers already hold its
plan and nothing is copied.

`gate_state` [max_rows, max_features + 1] holds, per row of the forward, whether each gate of
its config passed (1.0) or not (0.0), written at the gate's layer and read by the gated edits
at the same or a later layer of the same forward; its last column is always 1 (ungated edits).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from steerserve_sae.steering.slot_tables import SlotTables

# Rows of the routing buffer, per layer (kernels/steer_rows_cpu.cpp and the Triton kernels
# index them by these numbers).
STEER_ROWS, STEER_SLOTS, ENCODE_ROWS, ENCODE_SLOTS, VECTOR_ROWS, VECTOR_SLOTS = range(6)


class LayerPlan(NamedTuple):
    """This step's work at one layer: sizes of the routing buffer's live prefixes."""

    num_steered: int  # rows with an `add` vector here (their slots have one)
    num_encoded: int  # rows whose config clamps/scales/ablates, gates an edit or probes a gate here
    width: int  # feature-table columns in use at this layer
    gate_width: int  # gate columns probed at this layer
    num_vectored: int = 0  # rows with projected vector edits here (cap, ablate, gated add)
    vector_width: int = 0  # vector-table columns in use at this layer


class StepPlanner:
    def __init__(self, tables: SlotTables, max_rows: int, device: torch.device):
        self.tables = tables
        self.max_rows = max_rows  # vLLM's max_num_batched_tokens: rows of the largest step
        num_layers = len(tables.layer_pos)
        self.routing = torch.zeros((num_layers, 6, max_rows), dtype=torch.int64, device=device)
        self.plan_counts = torch.zeros((num_layers, 6), dtype=torch.int64, device=device)
        self.gate_state = torch.zeros((max_rows, tables.ungated + 1), dtype=torch.float32, device=device)
        self.gate_state[:, tables.ungated] = 1.0
        self.plans: list[LayerPlan | None] = [None] * num_layers  # None: nothing to do there
        self._counts_live = False  # plan_counts holds a plan (else all zero)
        self._key: tuple[bytes, int] | None = None  # (slots, tables version) the buffers hold
        self._cached: list[LayerPlan | None] = []

    def plan(self, slots: np.ndarray) -> None:
        """slots: this step's config slot per flattened row (0 = not steered)."""
        if not slots.any():
            self.clear()
            return
        key = (slots.tobytes(), self.tables.version)
        if key == self._key:
            self.plans = list(self._cached)
            return
        t = self.tables
        num_layers = len(t.layer_pos)
        self.plans = [None] * num_layers
        live = np.unique(slots[slots > 0])
        layers = np.flatnonzero((t.has_add[:, live] | t.needs_encode[:, live] | (t.vector_counts[:, live] > 0))
                                .any(axis=1))
        host = np.zeros((num_layers, 6, slots.size), dtype=np.int64)
        counts = np.zeros((num_layers, 6), dtype=np.int64)
        for li in layers:
            steered = np.flatnonzero(t.has_add[li][slots])
            encoded = np.flatnonzero(t.needs_encode[li][slots])
            host[li, STEER_ROWS, : steered.size] = steered
            host[li, STEER_SLOTS, : steered.size] = slots[steered]
            host[li, ENCODE_ROWS, : encoded.size] = encoded
            host[li, ENCODE_SLOTS, : encoded.size] = slots[encoded]
            width = int(t.encode_counts[li, slots[encoded]].max()) if encoded.size else 0
            gate_width = int(t.gate_counts[li, slots[encoded]].max()) if encoded.size else 0
            vectored = np.flatnonzero(t.vector_counts[li][slots] > 0)
            host[li, VECTOR_ROWS, : vectored.size] = vectored
            host[li, VECTOR_SLOTS, : vectored.size] = slots[vectored]
            vector_width = int(t.vector_counts[li, slots[vectored]].max()) if vectored.size else 0
            self.plans[li] = LayerPlan(steered.size, encoded.size, width, gate_width, vectored.size, vector_width)
            counts[li] = self.plans[li]
        self.routing[:, :, : slots.size].copy_(torch.from_numpy(host), non_blocking=True)
        self.plan_counts.copy_(torch.from_numpy(counts), non_blocking=True)
        self._counts_live = True
        self._key, self._cached = key, list(self.plans)

    def clear(self) -> None:
        """Nothing planned (unsteered steps, dummy and profiling runs)."""
        self.plans = [None] * len(self.plans)
        if self._counts_live:  # the buffers no longer hold the cached plan
            self.plan_counts.zero_()
            self._counts_live, self._key = False, None

    def planned_layers(self) -> set[int]:
        """Positions (not layer numbers) of the layers with work this step."""
        return {li for li, plan in enumerate(self.plans) if plan is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.routing, self.plan_counts, self.gate_state))
