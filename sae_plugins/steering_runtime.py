"""Per-worker steering state: the loaded SAEs, the slot tables and this step's token routing.

Buffers are allocated once at start-up and only written in place, so their addresses never
change (the property CUDA graphs need). Each step the model runner hook calls `begin_step`,
which maps requests to config slots and writes one slot index per flattened row; the custom op
then calls `apply` at each steered layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


class SteeringRuntime:
    def __init__(
        self, config: PluginConfig, saes: dict[int, SAEWeights], device: torch.device, max_num_tokens: int
    ):
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
        self.needs_encode = torch.zeros((num_layers, num_slots), dtype=torch.bool, device=device)
        self.slot_active = torch.zeros((num_layers, num_slots), dtype=torch.bool, device=device)
        self._encode_counts = np.zeros((num_layers, num_slots), dtype=np.int64)  # host copy
        self._encode_width = np.zeros(num_layers, dtype=np.int64)  # max count over live slots
        self.token_slot = torch.zeros(max_num_tokens, dtype=torch.int32, device=device)
        self._rows_written = 0
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
        self._write_token_slots(rows)

    def clear_step(self) -> None:
        """Zero the routing (before dummy/profiling runs, which must never be steered)."""
        self._write_token_slots(np.zeros(0, dtype=np.int32))
        self._step_captures = []

    def _write_token_slots(self, rows: np.ndarray) -> None:
        n = len(rows)
        if n:
            self.token_slot[:n].copy_(torch.from_numpy(rows), non_blocking=False)
            self.steered_tokens_total += int(np.count_nonzero(rows))
        if self._rows_written > n:
            self.token_slot[n : self._rows_written].zero_()
        self._rows_written = n

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
        self._steer(li, layer, hidden, residual)
        for spec, start, n, first_position in self._step_captures:
            if layer in spec.layers:  # features of the stream as edited at this layer
                x = hidden[start : start + n].float() + residual[start : start + n].float()
                positions = list(range(first_position, first_position + n))
                self.captures.record(spec, layer, positions, sae_math.encode(self.saes[layer], x))

    def _steer(self, li: int, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        slots = self.token_slot[: hidden.shape[0]].long()
        rows = self.slot_active[li][slots].nonzero().squeeze(-1)
        if rows.numel() == 0:
            return
        row_slots = slots[rows]
        delta = self.add_vectors[li, row_slots]  # [rows, d_model]; zero for configs without add
        width = int(self._encode_width[li])
        if width:
            enc = self.needs_encode[li][row_slots].nonzero().squeeze(-1)
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
