"""Per-worker steering state: the loaded SAEs, the slot tables and this step's token routing.

Every device buffer is allocated once at start-up and written in place, so the op always reads
the same addresses: the per-(layer, config slot) tables (one precomputed `add` vector; feature
ids and clamp/scale coefficients for the encoded modes; slot 0 = not steered, all zero) are
written when a config is installed, and a per-step routing buffer [layers, 4, max_rows] is
overwritten by one host-to-device copy in `begin_step`. That step plan is built on the host,
where the scheduler's data already is: per layer, the rows steered there with their slots, the
subset that needs an encode, and the live counts of both (`plan_counts`, the plan as a tensor).
The custom op then calls `apply` at each steered layer. On CPU that is one call of the native
kernel (cpu_kernel.py), which reads the counts and routing from those buffers, so nothing in
the forward branches on request data. Elsewhere `_steer` runs the same edit as plain PyTorch
(the reference the kernel is tested against), slicing by the plan's host-side counts: no
device-to-host synchronisation, and safe because the op runs outside captured graph pieces.

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
import os
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from . import cpu_kernel, sae_math
from .config_slots import ConfigSlots, ConfigSlotsExhausted
from .feature_capture import CAPTURE_KEY, CaptureSpec, CaptureStore
from .plugin_config import PluginConfig
from .sae import SAEWeights
from .steering_spec import EXTRA_ARGS_KEY, SteeringSpec
from .token_routing import APPLY_CODES, token_slots


logger = logging.getLogger("vllm.steerserve")
# Rows encoded at once by the PyTorch path and by captures: at Qwen3.5-27B shapes (81,920
# features, 5,120 wide, 64 features per request) one chunk needs at most ~0.4 GB of workspace,
# whatever the step's size.
ENCODE_CHUNK_ROWS = 256


@dataclass
class StepBatch:
    """This step's scheduled requests in row order, as arrays straight from the runner's own
    batch state: building the routing must not cost a Python object per request per step."""

    req_ids: Sequence[str]
    num_scheduled: np.ndarray  # rows this step per request
    num_computed: np.ndarray  # tokens already in the KV/state before this step
    num_prompt: np.ndarray  # prompt length
    extra_args_of: Callable[[str], dict | None]  # read once, when a request is first seen


@dataclass
class RequestView:
    """One scheduled request, spelled out (tests and callers without batch arrays)."""

    req_id: str
    extra_args: dict | None
    num_scheduled: int
    num_computed: int
    num_prompt: int

    @staticmethod
    def batch(views: list["RequestView"]) -> StepBatch:
        extra = {v.req_id: v.extra_args for v in views}
        return StepBatch(
            [v.req_id for v in views],
            np.array([v.num_scheduled for v in views], dtype=np.int64),
            np.array([v.num_computed for v in views], dtype=np.int64),
            np.array([v.num_prompt for v in views], dtype=np.int64),
            extra.get,
        )


class _RequestSteering(NamedTuple):
    spec: SteeringSpec | None
    capture: CaptureSpec | None


_UNSTEERED = _RequestSteering(None, None)


# Rows of the per-step routing buffer, per layer.
_STEER_ROWS, _STEER_SLOTS, _ENCODE_ROWS, _ENCODE_SLOTS = range(4)


class LayerPlan(NamedTuple):
    """This step's work at one layer: sizes of the routing buffer's live prefixes (host ints)."""

    num_steered: int  # rows with an `add` vector here (their slots have one)
    num_encoded: int  # rows whose config clamps/scales/ablates here
    width: int  # feature-table columns in use at this layer

class SteeringRuntime:
    def __init__(self, config: PluginConfig, saes: dict[int, SAEWeights], device: torch.device,
                 max_rows: int = 8192):
        self.config = config
        self.max_rows = max_rows  # vLLM's max_num_batched_tokens: rows of the largest step
        self.saes = saes
        self.device = device
        self.layer_pos = {layer: i for i, layer in enumerate(sorted(saes))}
        self.slots = ConfigSlots(config.num_slots)
        num_layers, num_slots = len(saes), self.slots.num_slots
        d_model = next(iter(saes.values())).d_model if saes else 0
        # add: one precomputed vector per (layer, slot); slot 0 stays zero.
        self.add_vectors = torch.zeros((num_layers, num_slots, d_model), dtype=torch.float32, device=device)
        # clamp/scale/ablate: per (layer, slot) feature tables; the coefficient on feature i's
        # decoder row is offset + gain * f_i (sae_math.edit_coefficients), (0, 0) = padding.
        shape = (num_layers, num_slots, config.max_features)
        self.feature_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.coefficients = torch.zeros((*shape, 2), dtype=torch.float32, device=device)  # (offset, gain)
        self.routing = torch.zeros((num_layers, 4, max_rows), dtype=torch.int64, device=device)
        # Live prefix sizes per layer (num_steered, num_encoded, width), the LayerPlan as a tensor:
        # the native kernel reads them here, so its call never depends on this step's requests.
        self.plan_counts = torch.zeros((num_layers, 3), dtype=torch.int64, device=device)
        self._counts_live = False
        # Per-layer views of the fixed buffers, made once: the op's Python then only slices.
        self._routing_rows = [tuple(self.routing[li].unbind(0)) for li in range(num_layers)]
        self._encode_tables = [(self.feature_ids[li], self.coefficients[li]) for li in range(num_layers)]
        self._add_tables = [self.add_vectors[li] for li in range(num_layers)]
        self._kernel, self.kernel_name = self._select_kernel(config, device, max_rows)
        self._kernel_args = (
            [self._kernel_layer_args(li, saes[layer]) for layer, li in self.layer_pos.items()] if self._kernel else []
        )
        # Host mirrors of what the plan needs, so it is built without touching the device.
        self.has_add = np.zeros((num_layers, num_slots), dtype=bool)
        self.needs_encode = np.zeros((num_layers, num_slots), dtype=bool)
        self._encode_counts = np.zeros((num_layers, num_slots), dtype=np.int64)  # host copy
        self.step_slots = np.zeros(0, dtype=np.int32)  # this step's slot per flattened row
        self._plans: list[LayerPlan | None] = [None] * num_layers
        self._plan_key: bytes | None = None  # the routing the buffer holds, and its plans
        self._cached_plans: list[LayerPlan | None] = []
        self._unapplied: set[int] = set()  # planned layers the op has not run at this step
        self._requests: dict[str, _RequestSteering] = {}  # per live request, read once
        # (spec, first row, rows, first position) of each capturing request in this step
        self._step_captures: list[tuple[CaptureSpec, int, int, int]] = []
        self.captures = CaptureStore()
        self.steered_tokens_total = 0
        self.rejected_requests_total = 0  # specs the worker refused (never sent by the API)
        self.steering_seconds = 0.0  # host time in begin_step and apply
        self.execute_seconds = 0.0  # host time in the runner's execute_model (runner_patch adds it)

    # ---- per step (host side) -------------------------------------------------------------
    def finish_requests(self, req_ids) -> None:
        """Forget finished (or aborted) requests and free their slots. Called on every step the
        scheduler sends, empty ones included: the step that reports the last requests of a
        burst as finished schedules no tokens, so no forward (and no begin_step) follows it."""
        for req_id in req_ids:
            self._requests.pop(req_id, None)
            freed = self.slots.release(req_id)
            if freed is not None:
                self._clear_slot(freed)

    def begin_step(self, batch: StepBatch) -> None:
        started = time.perf_counter()
        try:
            self._begin_step(batch)
        finally:
            self.steering_seconds += time.perf_counter() - started

    def _begin_step(self, batch: StepBatch) -> None:
        n = len(batch.req_ids)
        num_rows = int(batch.num_scheduled[:n].sum())
        if num_rows > self.max_rows:
            raise ValueError(f"steerserve: a step of {num_rows} rows exceeds the routing buffer ({self.max_rows})")
        req_slots = apply_to = None
        self._step_captures = []
        for i, req_id in enumerate(batch.req_ids):
            steering = self._requests.get(req_id)
            if steering is None:
                steering = self._read_request(req_id, batch.extra_args_of(req_id))
            if steering is _UNSTEERED:
                continue
            if steering.capture is not None:
                first_row = int(batch.num_scheduled[:i].sum())
                self._step_captures.append(
                    (steering.capture, first_row, int(batch.num_scheduled[i]), int(batch.num_computed[i]))
                )
            if steering.spec is not None:
                if req_slots is None:
                    req_slots, apply_to = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
                req_slots[i] = self._slot_for(req_id, steering.spec)
                apply_to[i] = APPLY_CODES[steering.spec.apply_to]
        if req_slots is None:  # the common step: nobody steered, nothing to plan
            rows = np.zeros(num_rows, dtype=np.int32)
            self._drop_plans()
        else:
            rows = token_slots(
                req_slots, apply_to, batch.num_scheduled[:n], batch.num_computed[:n], batch.num_prompt[:n]
            )
            self.steered_tokens_total += int(np.count_nonzero(rows))
            self._plan_step(rows)
        self.step_slots = rows
        self._unapplied = {li for li, plan in enumerate(self._plans) if plan is not None}
        self._unapplied |= {self.layer_pos[layer] for spec, *_ in self._step_captures for layer in spec.layers
                            if layer in self.layer_pos}

    def _read_request(self, req_id: str, extra_args: dict | None) -> _RequestSteering:
        """What a request asks for, read once. Request data must never raise inside a step: a
        spec that is unsigned, malformed or does not fit the loaded SAEs (the API never sends
        one) is logged and counted, and the request runs unsteered."""
        try:
            steering = self._parse_request(extra_args or {})
        except Exception as exc:  # noqa: BLE001 - whatever the data is, the engine must survive it
            self.rejected_requests_total += 1
            logger.error("steerserve: request %s: ignoring its steering/capture spec (%s: %s)",
                         req_id, type(exc).__name__, exc)
            steering = _UNSTEERED
        self._requests[req_id] = steering
        return steering

    def _parse_request(self, extra_args: dict) -> _RequestSteering:
        raw_spec, raw_capture = extra_args.get(EXTRA_ARGS_KEY), extra_args.get(CAPTURE_KEY)
        if raw_spec is None and raw_capture is None:
            return _UNSTEERED
        spec = SteeringSpec.from_extra_arg(raw_spec) if raw_spec is not None else None
        capture = CaptureSpec.from_extra_arg(raw_capture) if raw_capture is not None else None
        all_layers = set(self.config.sae_layers)  # every pipeline stage's, not only this one's
        for f in spec.features if spec else ():
            if f.layer not in all_layers:
                raise ValueError(f"layer {f.layer} has no SAE loaded")
            sae = self.saes.get(f.layer)
            if sae is not None and not 0 <= f.index < sae.d_sae:
                raise ValueError(f"feature index {f.index} out of range at layer {f.layer}")
        for layer in capture.layers if capture else ():
            if layer not in all_layers:
                raise ValueError(f"capture at layer {layer}, which has no SAE loaded")
            sae = self.saes.get(layer)
            if sae is not None and not 1 <= capture.top_k <= sae.d_sae:
                raise ValueError(f"capture top_k {capture.top_k} out of range at layer {layer}")
        return _RequestSteering(spec, capture)

    def _slot_for(self, req_id: str, spec: SteeringSpec) -> int:
        """The request's config slot; 0 (unsteered, logged) if the tables are full, which the
        API's admission keeps out of reach (see config_slots.py)."""
        slot = self.slots.slot_of(req_id)
        if slot is None:
            try:
                slot, is_new = self.slots.acquire(req_id, spec)
            except ConfigSlotsExhausted as exc:
                self.rejected_requests_total += 1
                logger.error("steerserve: request %s runs unsteered: %s", req_id, exc)
                self._requests[req_id] = _UNSTEERED
                return 0
            if is_new:
                self._write_slot(slot, spec)
        return slot

    def clear_step(self) -> None:
        """Drop the routing (before dummy/profiling runs, which must never be steered)."""
        self.step_slots = np.zeros(0, dtype=np.int32)
        self._drop_plans()
        self._step_captures = []
        self._unapplied = set()

    def _drop_plans(self) -> None:
        self._plans = [None] * len(self.layer_pos)
        if self._counts_live:  # the buffer no longer holds the cached plan
            self.plan_counts.zero_()
            self._counts_live, self._plan_key = False, None

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

    def _plan_step(self, slots: np.ndarray) -> None:
        """Fill the routing buffer's live prefixes for every layer with one copy. A decode step
        usually routes exactly like the previous one (same requests, one row each): then the
        buffer already holds this plan and nothing is rebuilt or copied."""
        key = slots.tobytes()
        if key == self._plan_key:
            self._plans = list(self._cached_plans)
            return
        self._plans = [None] * len(self.layer_pos)
        live = np.unique(slots[slots > 0])
        layers = np.flatnonzero((self.has_add[:, live] | self.needs_encode[:, live]).any(axis=1))
        host = np.zeros((len(self.layer_pos), 4, slots.size), dtype=np.int64)
        counts = np.zeros((len(self.layer_pos), 3), dtype=np.int64)
        for li in layers:
            steered = np.flatnonzero(self.has_add[li][slots])
            encoded = np.flatnonzero(self.needs_encode[li][slots])
            host[li, _STEER_ROWS, : steered.size] = steered
            host[li, _STEER_SLOTS, : steered.size] = slots[steered]
            host[li, _ENCODE_ROWS, : encoded.size] = encoded
            host[li, _ENCODE_SLOTS, : encoded.size] = slots[encoded]
            width = int(self._encode_counts[li, slots[encoded]].max()) if encoded.size else 0
            self._plans[li] = LayerPlan(steered.size, encoded.size, width)
            counts[li] = self._plans[li]
        self.routing[:, :, : slots.size].copy_(torch.from_numpy(host), non_blocking=True)
        self.plan_counts.copy_(torch.from_numpy(counts), non_blocking=True)
        self._counts_live = True
        self._plan_key, self._cached_plans = key, list(self._plans)

    def _write_slot(self, slot: int, spec: SteeringSpec) -> None:
        """Only this worker's layers: with pipeline parallelism the other stages write theirs."""
        self._plan_key = None  # a slot's tables change what a routing means
        for layer, li in self.layer_pos.items():
            adds = [f for f in spec.features if f.layer == layer and f.mode == "add"]
            encoded = [f for f in spec.features if f.layer == layer and f.mode != "add"]
            if adds:
                self.add_vectors[li, slot] = sae_math.add_vector(
                    self.saes[layer], [f.index for f in adds], [f.value for f in adds]
                )
            n = len(encoded)
            if n:
                coefficients = torch.tensor([sae_math.edit_coefficients(f.mode, f.value) for f in encoded])
                self.feature_ids[li, slot, :n] = torch.tensor([f.index for f in encoded])
                self.coefficients[li, slot, :n] = coefficients
            self._encode_counts[li, slot] = n
            self.needs_encode[li, slot] = n > 0
            self.has_add[li, slot] = bool(adds)

    def _clear_slot(self, slot: int) -> None:
        self._plan_key = None
        self.add_vectors[:, slot].zero_()
        self.coefficients[:, slot].zero_()
        self.needs_encode[:, slot] = False
        self.has_add[:, slot] = False
        self._encode_counts[:, slot] = 0

    # ---- in the forward (called by the custom op) ----------------------------------------
    def apply(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        li = self.layer_pos.get(layer)
        if li is None:
            return
        started = time.perf_counter()
        self._unapplied.discard(li)
        if self._kernel is not None:
            self._kernel(hidden, residual, *self._kernel_args[li])
        else:
            self._steer(li, layer, hidden, residual)
        for spec, start, n, first_position in self._step_captures:
            if layer in spec.layers:  # features of the stream as edited at this layer
                for lo in range(0, n, ENCODE_CHUNK_ROWS):  # bounded [rows, d_sae] workspace
                    hi = min(n, lo + ENCODE_CHUNK_ROWS)
                    x = hidden[start + lo : start + hi].float() + residual[start + lo : start + hi].float()
                    positions = list(range(first_position + lo, first_position + hi))
                    self.captures.record(spec, layer, positions, sae_math.encode(self.saes[layer], x))
        self.steering_seconds += time.perf_counter() - started

    @staticmethod
    def _select_kernel(config: PluginConfig, device: torch.device, max_rows: int):
        """(op, name): the native CPU kernel, the experimental Triton kernels, or None for the
        PyTorch path (see cpu_kernel.py and triton_kernel.py)."""
        if config.steering_kernel == "triton":
            from .triton_kernel import TritonSteering, runs_on

            if not runs_on(device):
                raise ValueError(f"--steering-kernel triton needs a CUDA device, not {device}")
            return TritonSteering(max_rows, config.max_features, device), "triton"
        native = cpu_kernel.select(config.steering_kernel, device)
        return native, ("native-cpu" if native is not None else "torch")

    def _kernel_layer_args(self, li: int, sae: SAEWeights) -> tuple:
        """A kernel's arguments after (hidden, residual) at one layer: fixed buffers and the SAE
        in the form the PyTorch path computes with, made once."""
        if self.kernel_name == "native-cpu":
            sae.pack_encoder_panels()
        W_enc, b_enc = sae.encoder()
        return (
            self.routing[li], self.plan_counts[li], self.add_vectors[li], self.feature_ids[li],
            self.coefficients[li], W_enc, sae.encoder_panels, b_enc,
            sae.b_dec.float() if sae.apply_b_dec_to_input else None,
            sae.W_dec.contiguous(), sae.threshold.float() if sae.activation == "jumprelu" else None,
            sae.k if sae.activation == "topk" else 0,
        )

    def _steer(self, li: int, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """The steering step in plain PyTorch: the reference the native CPU kernel is tested
        against, and the path on GPUs."""
        plan = self._plans[li]
        if plan is None:
            return
        steer_rows, steer_slots, encode_rows, encode_slots = self._routing_rows[li]
        # Every edit at a layer reads the stream as it arrived there; chunks bound the workspace
        # (pre-activations [rows, d_sae] and decoder rows [rows, width, d_model]).
        for lo in range(0, plan.num_encoded, ENCODE_CHUNK_ROWS):
            hi = min(plan.num_encoded, lo + ENCODE_CHUNK_ROWS)
            rows, slots = encode_rows[lo:hi], encode_slots[lo:hi]
            h = hidden.index_select(0, rows).float()
            feature_ids, coefficients = self._encode_tables[li]
            delta = sae_math.encoded_delta(
                self.saes[layer],
                h + residual.index_select(0, rows),
                feature_ids.index_select(0, slots)[:, : plan.width],
                *coefficients.index_select(0, slots)[:, : plan.width].unbind(-1),
            )
            # Encoded rows are distinct, so write them back (one rounding) rather than add.
            hidden.index_copy_(0, rows, h.add_(delta).to(hidden.dtype))
        if plan.num_steered:
            rows, slots = steer_rows[: plan.num_steered], steer_slots[: plan.num_steered]
            hidden.index_add_(0, rows, self._add_tables[li].index_select(0, slots).to(hidden.dtype))

    def reserve_workspace(self) -> None:
        """Run the PyTorch edit and a capture encode once at their largest (one chunk of rows,
        every feature column, the widest SAE), so vLLM's memory profile, which runs with no
        request steered, sees the peak they add and sizes the KV cache with it."""
        if not self.saes:
            return
        sae = max(self.saes.values(), key=lambda s: s.d_sae)
        rows, width = min(ENCODE_CHUNK_ROWS, self.max_rows), self.config.max_features
        x = torch.zeros((rows, sae.d_model), dtype=torch.float32, device=self.device)
        ids = torch.zeros((rows, width), dtype=torch.int64, device=self.device)
        zeros = torch.zeros((rows, width), dtype=torch.float32, device=self.device)
        sae_math.encoded_delta(sae, x, ids, zeros, zeros)
        sae_math.encode(sae, x)

    def workspace_bytes(self) -> int:
        """Upper estimate of what reserve_workspace allocates: a chunk's pre-activations (and
        the dense float32 code of a capture, twice over for TopK's scatter) and its gathered
        decoder rows."""
        if not self.saes:
            return 0
        sae = max(self.saes.values(), key=lambda s: s.d_sae)
        rows = min(ENCODE_CHUNK_ROWS, self.max_rows)
        return rows * (3 * sae.d_sae * 4 + self.config.max_features * sae.d_model * 4)

    # ---- reporting ------------------------------------------------------------------------
    def table_bytes(self) -> int:
        """Device memory of the per-slot tables and the routing buffer (the cost of capacity:
        linear in --max-steering-configs, --max-steering-features and the steered layers)."""
        tensors = (self.add_vectors, self.feature_ids, self.coefficients, self.routing, self.plan_counts)
        return sum(t.numel() * t.element_size() for t in tensors)

    def sae_info(self) -> list[dict]:
        """Per loaded layer; `source` relative to the --sae directory (clients need not learn
        the server's file system)."""
        return [self.saes[layer].info() | {"source": os.path.relpath(self.saes[layer].source, self.config.sae_path)}
                for layer in sorted(self.saes)]
