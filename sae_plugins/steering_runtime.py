"""Per-worker steering state: the loaded SAEs, the slot tables and this step's token routing.

The tables (add vectors, encode feature tables) are allocated once at start-up and written in
place when a config is installed. Each step the model runner hook calls `begin_step`, which
maps requests to config slots and, on the host, plans per layer which rows are steered and
which of those need an encode; the custom op then calls `apply` at each steered layer, which
only gathers and scatters with those precomputed indices: no device-to-host synchronisation.

Tensor parallelism. At a decoder layer's output, `hidden` and `residual` are replicated on
every TP rank (row-parallel projections all-reduce), so each rank holds the whole SAE and
computes the same edit with no communication. vLLM's all-reduce + add-RMSNorm fusion cannot
fuse across a steered layer's boundary: the steering op is a graph-splitting op sitting between
the all-reduce and the next norm, so the stream at the hook point stays whole. (MoE sequence
parallelism, which would hand each rank a slice of the tokens, only applies to MoE models; none
of the supported architectures is one.) To save memory the SAE could instead be sharded over
ranks: W_enc column-parallel over features (each rank pre-activates d_sae / tp features), a
cross-rank top-k (each rank's local top-k, all-gathered, then the global k-th value as the
threshold), and W_dec row-parallel over the same features so each rank decodes the touched
features it owns and one all-reduce sums the edit: memory / tp for one extra small all-gather
and one all-reduce of [rows, d_model] per steered layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import sae_math
from .config_slots import ConfigSlots
from .feature_capture import CAPTURE_KEY, CaptureSpec, CaptureStore
from .plugin_config import PluginConfig
from .sae import SAEWeights
from .steering_spec import EXTRA_ARGS_KEY, SteeringSpec
from .token_routing import APPLY_CODES, token_slots

logger = logging.getLogger(__name__)


@dataclass
class RequestView:
    """What the routing needs to know about one scheduled request."""

    req_id: str
    extra_args: dict | None
    num_scheduled: int
    num_computed: int
    num_prompt: int


class LayerPlan(NamedTuple):
    """This step's work at one layer (device tensors built on the host before the forward)."""

    rows: torch.Tensor  # flattened rows that are steered here
    row_slots: torch.Tensor  # their config slots
    encode: torch.Tensor | None  # positions within `rows` whose config needs an encode


class SteeringRuntime:
    def __init__(self, config: PluginConfig, saes: dict[int, SAEWeights], device: torch.device):
        self.config = config
        self.saes = saes
        self.device = device
        self.layer_pos = {layer: i for i, layer in enumerate(sorted(saes))}
        # Headroom above the admitted number of configs (see config_slots.py).
        self.slots = ConfigSlots(2 * config.max_configs + 1)
        num_layers, num_slots = len(saes), self.slots.num_slots
        d_model = next(iter(saes.values())).d_model if saes else 0
        # add: one precomputed vector per (layer, slot); slot 0 stays zero.
        self.add_vectors = torch.zeros((num_layers, num_slots, d_model), dtype=torch.float32, device=device)
        # clamp/scale/ablate: per (layer, slot) feature tables, padded with MODE_NONE.
        shape = (num_layers, num_slots, config.max_features)
        self.feature_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.modes = torch.zeros(shape, dtype=torch.int8, device=device)
        self.values = torch.zeros(shape, dtype=torch.float32, device=device)
        self.needs_encode = np.zeros((num_layers, num_slots), dtype=bool)  # host: the plan is built there
        self.slot_active = np.zeros((num_layers, num_slots), dtype=bool)
        self._encode_counts = np.zeros((num_layers, num_slots), dtype=np.int64)  # host copy
        self._encode_width = np.zeros(num_layers, dtype=np.int64)  # max count over live slots
        self.step_slots = np.zeros(0, dtype=np.int32)  # this step's slot per flattened row
        self._plans: list[LayerPlan | None] = [None] * num_layers
        self._unapplied: set[int] = set()  # planned layers the op has not run at this step
        self._specs: dict[str, SteeringSpec | None] = {}
        self._capture_specs: dict[str, CaptureSpec | None] = {}
        # (spec, first row, rows, first position) of each capturing request in this step
        self._step_captures: list[tuple[CaptureSpec, int, int, int]] = []
        self.captures = CaptureStore()
        self.steered_tokens_total = 0

    # ---- per step (host side) -------------------------------------------------------------
    def begin_step(self, finished_req_ids, requests: list[RequestView]) -> None:
        for req_id in finished_req_ids:
            self._specs.pop(req_id, None)
            self._capture_specs.pop(req_id, None)
            freed = self.slots.release(req_id)
            if freed is not None:
                self._clear_slot(freed)
        n = len(requests)
        req_slots = np.zeros(n, dtype=np.int64)
        apply_to = np.zeros(n, dtype=np.int64)
        self._step_captures = []
        row = 0
        for req in requests:
            capture = self._capture_of(req)
            if capture is not None:
                self._step_captures.append((capture, row, req.num_scheduled, req.num_computed))
            row += req.num_scheduled
        for i, req in enumerate(requests):
            spec = self._spec_of(req)
            if spec is None:
                continue
            slot = self.slots.slot_of(req.req_id)
            if slot is None:
                slot, is_new = self.slots.acquire(req.req_id, spec)
                if is_new:
                    self._write_slot(slot, spec)
            req_slots[i] = slot
            apply_to[i] = APPLY_CODES[spec.apply_to]
        rows = token_slots(
            req_slots,
            apply_to,
            np.array([r.num_scheduled for r in requests], dtype=np.int64),
            np.array([r.num_computed for r in requests], dtype=np.int64),
            np.array([r.num_prompt for r in requests], dtype=np.int64),
        )
        self.step_slots = rows
        self.steered_tokens_total += int(np.count_nonzero(rows))
        self._plans = [self._plan_layer(li, rows) for li in range(len(self.layer_pos))]
        self._unapplied = {li for li, plan in enumerate(self._plans) if plan is not None}
        self._unapplied |= {self.layer_pos[layer] for spec, *_ in self._step_captures for layer in spec.layers}

    def clear_step(self) -> None:
        """Drop the routing (before dummy/profiling runs, which must never be steered)."""
        self.step_slots = np.zeros(0, dtype=np.int32)
        self._plans = [None] * len(self.layer_pos)
        self._step_captures = []
        self._unapplied = set()

    def verify_applied(self) -> None:
        """After the forward: every layer planned for this step must have run the op. If a
        captured graph replayed it instead, fail the step rather than sample unsteered tokens."""
        if self._unapplied:
            layers = sorted(layer for layer, li in self.layer_pos.items() if li in self._unapplied)
            self._unapplied = set()
            raise RuntimeError(
                f"steerserve: the steering op did not run at layers {layers} in this forward (a captured "
                "CUDA graph replayed it); serve with cudagraph_mode PIECEWISE or --enforce-eager"
            )

    def _plan_layer(self, li: int, slots: np.ndarray) -> LayerPlan | None:
        rows = np.flatnonzero(self.slot_active[li][slots])
        if rows.size == 0:
            return None
        row_slots = slots[rows]
        encode = np.flatnonzero(self.needs_encode[li][row_slots])

        def to_device(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.int64)).to(self.device, non_blocking=True)

        return LayerPlan(to_device(rows), to_device(row_slots), to_device(encode) if encode.size else None)

    def _spec_of(self, req: RequestView) -> SteeringSpec | None:
        if req.req_id not in self._specs:
            raw = (req.extra_args or {}).get(EXTRA_ARGS_KEY)
            self._specs[req.req_id] = SteeringSpec.from_extra_arg(raw) if raw else None
        return self._specs[req.req_id]

    def _capture_of(self, req: RequestView) -> CaptureSpec | None:
        if req.req_id not in self._capture_specs:
            raw = (req.extra_args or {}).get(CAPTURE_KEY)
            self._capture_specs[req.req_id] = CaptureSpec.from_extra_arg(raw) if raw else None
        return self._capture_specs[req.req_id]

    def _write_slot(self, slot: int, spec: SteeringSpec) -> None:
        for f in spec.features:  # the HTTP layer validates this; a raw extra_arg must not pass
            if f.layer not in self.layer_pos:
                raise ValueError(f"steering references layer {f.layer}, which has no SAE loaded")
            if not 0 <= f.index < self.saes[f.layer].d_sae:
                raise ValueError(f"feature index {f.index} out of range at layer {f.layer}")
        for layer, li in self.layer_pos.items():
            adds = [f for f in spec.features if f.layer == layer and f.mode == "add"]
            encoded = [f for f in spec.features if f.layer == layer and f.mode != "add"]
            if adds:
                self.add_vectors[li, slot] = sae_math.add_vector(
                    self.saes[layer], [f.index for f in adds], [f.value for f in adds]
                )
            n = len(encoded)
            if n:
                self.feature_ids[li, slot, :n] = torch.tensor([f.index for f in encoded])
                self.modes[li, slot, :n] = torch.tensor([sae_math.ENCODE_MODE_CODES[f.mode] for f in encoded])
                self.values[li, slot, :n] = torch.tensor([f.target for f in encoded])
            self._encode_counts[li, slot] = n
            self.needs_encode[li, slot] = n > 0
            self.slot_active[li, slot] = bool(adds) or n > 0
        self._encode_width = self._encode_counts.max(axis=1)

    def _clear_slot(self, slot: int) -> None:
        self.add_vectors[:, slot].zero_()
        self.modes[:, slot].zero_()
        self.needs_encode[:, slot] = False
        self.slot_active[:, slot] = False
        self._encode_counts[:, slot] = 0
        self._encode_width = self._encode_counts.max(axis=1)

    # ---- in the forward (called by the custom op) ----------------------------------------
    def apply(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        li = self.layer_pos.get(layer)
        if li is None:
            return
        self._unapplied.discard(li)
        self._steer(li, layer, hidden, residual)
        for spec, start, n, first_position in self._step_captures:
            if layer in spec.layers:  # features of the stream as edited at this layer
                x = hidden[start : start + n].float() + residual[start : start + n].float()
                positions = list(range(first_position, first_position + n))
                self.captures.record(spec, layer, positions, sae_math.encode(self.saes[layer], x))

    def _steer(self, li: int, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        plan = self._plans[li]
        if plan is None:
            return
        rows, row_slots, enc = plan
        delta = self.add_vectors[li, row_slots]  # [rows, d_model]; zero for configs without add
        if enc is not None:
            width = int(self._encode_width[li])
            enc_rows, enc_slots = rows[enc], row_slots[enc]
            x = hidden[enc_rows].float() + residual[enc_rows].float()
            delta.index_add_(
                0,
                enc,
                sae_math.encoded_delta(
                    self.saes[layer],
                    x,
                    self.feature_ids[li, enc_slots, :width],
                    self.modes[li, enc_slots, :width],
                    self.values[li, enc_slots, :width],
                ),
            )
        hidden.index_add_(0, rows, delta.to(hidden.dtype))

    # ---- reporting ------------------------------------------------------------------------
    def sae_info(self) -> list[dict]:
        return [self.saes[layer].info() for layer in sorted(self.saes)]
