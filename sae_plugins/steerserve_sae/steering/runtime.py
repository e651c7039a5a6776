"""Per-worker steering: a small runtime composing the parts, one step at a time.

  * requests: each live request's steering and capture spec, read and checked once (a spec the
    API did not sign, or that does not fit the loaded SAEs, runs its request unsteered);
  * config_slots.py: which request holds which config slot (equal specs share one);
  * slot_tables.py: what each slot does at each layer (device tables written once per config);
  * step_plan.py: this step's rows per layer, in fixed device buffers;
  * capture/features.py: the rows of requests that record features;
  * gating.py: how many tokens passed each gate of the requests that want a report;
  * capture/store.py: the results kept for the API (captures, gate reports, refusals), within
    a byte budget, owned by their requests while they run;
  * backends/: the edit itself (PyTorch reference, native CPU kernel, Triton).
The custom op (backends/op.py) finds the runtime in registry.py and calls `apply` at each
steered layer; vllm_hooks/runner_patch.py calls the per-step methods.

Tensor parallelism. At a decoder layer's output, `hidden` and `residual` are replicated on
every TP rank (row-parallel projections all-reduce), so each rank holds the whole SAE and
computes the same edit with no communication (tests/test_tensor_parallel.py). vLLM's
all-reduce + add-RMSNorm fusion cannot fuse across a steered layer's boundary: the steering op
is a graph-splitting op sitting between the all-reduce and the next norm, so the stream at the
hook point stays whole. (vLLM 0.32 has no dense sequence-parallel pass; MoE sequence
parallelism only applies to MoE models, and none of the supported architectures is one.) To
save memory the SAE could instead be sharded over ranks: W_enc column-parallel over features,
a cross-rank top-k (each rank's local top-k, all-gathered, then the global k-th value), and
W_dec row-parallel over the same features with one all-reduce of the edit.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from steerserve_sae.steering import gating
from steerserve_sae.sae import sae_math
from steerserve_sae.backends import LayerBuffers, select_backend
from steerserve_sae.steering.config_slots import ConfigSlots, ConfigSlotsExhausted
from steerserve_sae.capture.features import ENCODE_CHUNK_ROWS, CaptureStore, StepCapture, choice_index
from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.protocol.rpc import CAPTURE_KEY, CAPTURES, EXTRA_ARGS_KEY, GATE_REPORT_KEY, GATE_REPORTS, \
    REJECTIONS, SAEInfo, WorkerStats, report_id_from_extra_arg, trace_key
from steerserve_sae.capture.rejections import Rejections, ticket_of
from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.sae.formats.qwen_scope import trained_on
from steerserve_sae.steering.request_fit import check_fits
from steerserve_sae.steering.slot_tables import SlotTables
from steerserve_sae.steering.step_plan import StepPlanner
from steerserve_sae.protocol.spec import SteeringSpec
from steerserve_sae.steering.token_routing import APPLY_CODES, token_slots
from steerserve_sae.capture.store import WorkerStore

logger = logging.getLogger("vllm.steerserve")


@dataclass
class StepBatch:
    """This step's scheduled requests in row order, as arrays straight from the runner's own
    batch state: building the routing must not cost a Python object per request per step."""

    req_ids: Sequence[str]
    num_scheduled: np.ndarray  # rows this step per request
    num_computed: np.ndarray  # tokens already in the KV/state before this step
    num_prompt: np.ndarray  # prompt length
    extra_args_of: Callable[[str], dict | None]  # read once, when a request is first seen


class _RequestSteering(NamedTuple):
    spec: SteeringSpec | None
    capture: CaptureSpec | None
    gate_report: str | None = None  # report id: count the tokens that pass the spec's gates
    ticket: str | None = None  # where a refusal of the spec is recorded for the API (rejections.py)
    local_gates: np.ndarray | None = None  # per gate of the spec: its layer is on this worker (pipeline stage)


_UNSTEERED = _RequestSteering(None, None)


class SteeringRuntime:
    def __init__(self, config: PluginConfig, saes: dict[int, SAEWeights], device: torch.device,
                 max_rows: int = 8192, vector_layers: tuple[int, ...] | None = None, d_model: int = 0):
        """`vector_layers`: this worker's layers without an SAE where direction vectors steer
        (default: every --steering-layers layer without one); `d_model`: the stream's width
        (read from the SAEs when there are any)."""
        self.config = config
        self.saes = saes  # this worker's layers (a pipeline stage holds only its own)
        self.vector_layers = tuple(config.vector_only_layers if vector_layers is None else vector_layers)
        self.d_model = next(iter(saes.values())).d_model if saes else d_model
        self.device = device
        self.slots = ConfigSlots(config.num_slots)
        self.tables = SlotTables(saes, config.num_slots, config.max_features, device, config.max_vectors,
                                 self.vector_layers, self.d_model)
        self.planner = StepPlanner(self.tables, max_rows, device)
        self.store = WorkerStore(config.max_store_bytes)
        self.captures = CaptureStore(self.store)
        self.gate_reports = gating.GateReports(self.store)
        self.rejections = Rejections(self.store)
        self.backend = select_backend(config.steering_kernel, device, max_rows, config.max_features)
        self._layers = {
            layer: LayerBuffers(layer, saes.get(layer), self.planner.routing[li], self.planner.plan_counts[li],
                                self.tables.add_vectors[li], self.tables.feature_ids[li], self.tables.coefficients[li],
                                self.tables.edit_gates[li], self.tables.gate_ids[li], self.tables.gate_bounds[li],
                                self.planner.gate_state, self.tables.vector_pool, self.tables.vector_ids[li],
                                self.tables.vector_rules[li], self.tables.vector_gates[li])
            for layer, li in self.tables.layer_pos.items()
        }
        for layer in self._layers.values():
            self.backend.prepare(layer)
        self.step_slots = np.zeros(0, dtype=np.int32)  # this step's slot per flattened row
        self._requests: dict[str, _RequestSteering] = {}  # per live request, read once
        # per live request that records (captures, gate counts): positions below it were recorded
        # already, so rows a preemption computes again are not recorded twice
        self._recorded_below: dict[str, int] = {}
        self._unapplied: set[int] = set()  # layers planned for this step the op has not run at
        self.steered_tokens_total = 0
        self.rejected_requests_total = 0  # specs the worker refused (never sent by the API)
        self.steering_seconds = 0.0  # host time in begin_step, apply and counting gates
        self.execute_seconds = 0.0  # host time in the runner's execute_model (runner_patch adds it)

    @property
    def kernel_name(self) -> str:
        return self.backend.name

    # ---- per step (host side) -------------------------------------------------------------
    def finish_requests(self, req_ids) -> None:
        """Forget finished (or aborted) requests and free their slots. Called on every step the
        scheduler sends, empty ones included: the step that reports the last requests of a
        burst as finished schedules no tokens, so no forward (and no begin_step) follows it."""
        self.store.finish(req_ids)
        for req_id in req_ids:
            self._requests.pop(req_id, None)
            self._recorded_below.pop(req_id, None)
            freed = self.slots.release(req_id)
            if freed is not None:
                self.tables.clear(freed)

    def begin_step(self, batch: StepBatch) -> None:
        started = time.perf_counter()
        try:
            self._begin_step(batch)
        finally:
            self.steering_seconds += time.perf_counter() - started

    def _begin_step(self, batch: StepBatch) -> None:
        n = len(batch.req_ids)
        num_rows = int(batch.num_scheduled[:n].sum())
        if num_rows > self.planner.max_rows:
            raise ValueError(f"steerserve: a step of {num_rows} rows exceeds the routing buffer "
                             f"({self.planner.max_rows})")
        req_slots = apply_to = None
        captures: list[StepCapture] = []
        gated: list[gating.GatedRows] = []
        for i, req_id in enumerate(batch.req_ids):
            steering = self._requests.get(req_id)
            if steering is None:
                steering = self._read_request(req_id, batch.extra_args_of(req_id))
            if steering is _UNSTEERED:
                continue
            first_row = fresh = 0
            scheduled, computed = int(batch.num_scheduled[i]), int(batch.num_computed[i])
            if steering.capture or steering.gate_report:
                first_row = int(batch.num_scheduled[:i].sum())
                recorded_below = self._recorded_below.get(req_id, 0)
                fresh = max(0, min(scheduled, recorded_below - computed))  # leading rows recorded before
                self._recorded_below[req_id] = max(recorded_below, computed + scheduled)
            if steering.capture is not None:
                capture = StepCapture.of_request(steering.capture, req_id, first_row, scheduled, computed,
                                                 int(batch.num_prompt[i]), computed + fresh)
                if capture is not None:
                    captures.append(capture)
            if steering.spec is not None:
                if req_slots is None:
                    req_slots, apply_to = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
                req_slots[i] = self._slot_for(req_id, steering.spec)
                apply_to[i] = APPLY_CODES[steering.spec.apply_to]
                if steering.gate_report is not None and req_slots[i] and fresh < scheduled:
                    gated.append(gating.GatedRows(steering.gate_report, steering.local_gates, first_row + fresh,
                                                  scheduled - fresh))
        if req_slots is None:  # the common step: nobody steered, nothing to plan
            rows = np.zeros(num_rows, dtype=np.int32)
        else:
            rows = token_slots(
                req_slots, apply_to, batch.num_scheduled[:n], batch.num_computed[:n], batch.num_prompt[:n]
            )
            self.steered_tokens_total += int(np.count_nonzero(rows))
        self.planner.plan(rows)
        self.captures.begin_step(captures)
        self.gate_reports.begin_step(gated)
        self.step_slots = rows
        layer_pos = self.tables.layer_pos
        self._unapplied = self.planner.planned_layers() | {
            layer_pos[layer] for layer in self.captures.layers_this_step() if layer in layer_pos}

    def _read_request(self, req_id: str, extra_args: dict | None) -> _RequestSteering:
        """What a request asks for, read once. Request data must never raise inside a step: a
        spec that is unsigned, malformed or does not fit the loaded SAEs (the API never sends
        one) is logged and counted, and the request runs unsteered."""
        extra_args = extra_args or {}
        ticket = ticket_of(extra_args)
        if ticket is not None:
            self.store.own(req_id, (REJECTIONS, ticket))
        try:
            steering = self._parse_request(extra_args)
        except Exception as exc:  # noqa: BLE001 - whatever the data is, the engine must survive it
            self.rejected_requests_total += 1
            reason = f"{type(exc).__name__}: {exc}"
            logger.error("steerserve: request %s: ignoring its steering/capture spec (%s)", req_id, reason)
            self.rejections.record(ticket, reason)
            steering = _UNSTEERED
        if steering.capture is not None:
            capture = steering.capture
            self.store.own(req_id, (CAPTURES, trace_key(capture.id, choice_index(req_id)) if capture.trace else capture.id))
        if steering.gate_report is not None:
            self.store.own(req_id, (GATE_REPORTS, steering.gate_report))
        self._requests[req_id] = steering
        return steering

    def _parse_request(self, extra_args: dict) -> _RequestSteering:
        raw_spec, raw_capture = extra_args.get(EXTRA_ARGS_KEY), extra_args.get(CAPTURE_KEY)
        if raw_spec is None and raw_capture is None:
            return _UNSTEERED
        spec = SteeringSpec.from_extra_arg(raw_spec) if raw_spec is not None else None
        capture = CaptureSpec.from_extra_arg(raw_capture) if raw_capture is not None else None
        raw_report = extra_args.get(GATE_REPORT_KEY)
        report = report_id_from_extra_arg(raw_report) if raw_report is not None and spec and spec.gates else None
        check_fits(spec, capture, self.config, self.saes, self.d_model, set(self.tables.layer_pos))
        local_gates = np.array([gate.layer in self.saes for gate in spec.gates], dtype=bool) if report else None
        return _RequestSteering(spec, capture, report, ticket_of(extra_args), local_gates)

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
                self.rejections.record(self._requests[req_id].ticket, f"{type(exc).__name__}: {exc}")
                self._requests[req_id] = _UNSTEERED
                return 0
            if is_new:
                self.tables.write(slot, spec)
        return slot

    def clear_step(self) -> None:
        """Drop the routing (before dummy/profiling runs, which must never be steered)."""
        self.step_slots = np.zeros(0, dtype=np.int32)
        self.planner.clear()
        self.captures.begin_step([])
        self.gate_reports.begin_step([])
        self._unapplied = set()

    def end_step(self) -> None:
        """After the forward: check it steered, then count the tokens that passed each gate."""
        self.verify_applied()
        started = time.perf_counter()
        self.gate_reports.end_step(self.planner.gate_state, self.step_slots)
        self.steering_seconds += time.perf_counter() - started

    def verify_applied(self) -> None:
        """Every layer planned for this step must have run the op. If a captured graph
        replayed it instead, fail the step rather than sample unsteered tokens."""
        if self._unapplied:
            layers = sorted(layer for layer, li in self.tables.layer_pos.items() if li in self._unapplied)
            self._unapplied = set()
            raise RuntimeError(
                f"steerserve: the steering op did not run at layers {layers} in this forward (a captured "
                "CUDA graph replayed it); serve with cudagraph_mode PIECEWISE or --enforce-eager"
            )

    # ---- in the forward (called by the custom op) ----------------------------------------
    def apply(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        buffers = self._layers.get(layer)
        if buffers is None:
            return
        started = time.perf_counter()
        li = self.tables.layer_pos[layer]
        self._unapplied.discard(li)
        self.backend.apply(buffers, self.planner.plans[li], hidden, residual)
        if buffers.sae is not None:
            self.captures.record_layer(layer, buffers.sae, hidden, residual)  # the stream as edited here
        self.steering_seconds += time.perf_counter() - started

    # ---- memory ---------------------------------------------------------------------------
    def reserve_workspace(self) -> None:
        """Run the PyTorch edit and a capture encode once at their largest (one chunk of rows,
        every feature column, the widest SAE), so vLLM's memory profile, which runs with no
        request steered, sees the peak they add and sizes the KV cache with it."""
        if not self.saes:
            return
        sae = max(self.saes.values(), key=lambda s: s.d_sae)
        rows, width = min(ENCODE_CHUNK_ROWS, self.planner.max_rows), self.config.max_features
        x = torch.zeros((rows, sae.d_model), dtype=torch.float32, device=self.device)
        ids = torch.zeros((rows, width), dtype=torch.int64, device=self.device)
        zeros = torch.zeros((rows, width), dtype=torch.float32, device=self.device)
        sae_math.encoded_delta(sae, x, ids, zeros, zeros)
        sae_math.encode(sae, x)

    def workspace_bytes(self) -> int:
        """Upper estimate of what reserve_workspace allocates: a chunk's pre-activations (and
        the dense float32 code of a capture, twice over for TopK's selection) and its gathered
        decoder rows."""
        if not self.saes:
            return 0
        sae = max(self.saes.values(), key=lambda s: s.d_sae)
        rows = min(ENCODE_CHUNK_ROWS, self.planner.max_rows)
        return rows * (3 * sae.d_sae * 4 + self.config.max_features * sae.d_model * 4)

    def table_bytes(self) -> int:
        """Device memory of the slot tables and the step buffers (the cost of capacity: linear
        in --max-steering-configs, --max-steering-features and the steered layers)."""
        return self.tables.nbytes() + self.planner.nbytes()

    # ---- reporting ------------------------------------------------------------------------
    def sae_info(self) -> list[SAEInfo]:
        """Per loaded layer; `source` relative to the --sae directory (clients need not learn
        the server's file system), under `hf://owner/name@<commit>/` when --sae was a hub id."""
        def source(sae: SAEWeights) -> str:
            relative = os.path.relpath(sae.source, self.config.sae_path)
            return f"{self.config.sae_hub_url}/{relative}" if self.config.sae_hub_url else relative

        hub_repo = self.config.sae_hub_url.removeprefix("hf://").split("@")[0] if self.config.sae_hub_url else None
        model = trained_on(self.config.sae_name, hub_repo)
        return [self.saes[layer].info() | {"source": source(self.saes[layer]), "model": model}
                for layer in sorted(self.saes)]

    def stats(self) -> WorkerStats:
        return {
            "steered_tokens_total": self.steered_tokens_total,
            "active_configs": self.slots.active,
            "rejected_requests_total": self.rejected_requests_total,
            "sae_memory_bytes": {layer: sae.nbytes() for layer, sae in sorted(self.saes.items())},
            "sae_layers": sorted(self.saes),
            "vector_layers": list(self.vector_layers),  # this worker's layers steered by vectors only
            "steering_kernel": self.kernel_name,
            # Host time (on CPU the real cost; on GPU what it takes to launch the work).
            "steering_seconds_total": self.steering_seconds,
            "execute_seconds_total": self.execute_seconds,
            **self.store.stats(),
        }
