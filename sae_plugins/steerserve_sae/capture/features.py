"""Recording which SAE features fire on a request's tokens, inside the serving forward.

An inspect request, or a completion that asks for a `trace`, carries a capture spec
(protocol/capture.py) in `extra_args[rpc.CAPTURE_KEY]`. Each step the runtime
tells the store which rows of the step belong to capturing requests (`begin_step`); at each
captured layer the steering op hands over the stream after any steering edit there
(`record_layer`), which is encoded in chunks of ENCODE_CHUNK_ROWS rows (a bounded workspace)
and kept as each position's top-k features plus running per-feature max / sum / count for the
aggregate. The API process takes the result by capture id over collective RPC once the request
has finished. Chunked prefill simply records several times.

A trace records while the request generates: only from the last prompt position on when it
asks for `generation_only`, no aggregate, and one result per choice (with `n > 1` vLLM runs a
child request per choice, all with the same capture spec), under `trace_key(id, choice)`. With
`residuals` it also keeps each position's stream itself (capture.RESIDUAL_ENCODING), at most that many
positions per layer and result: the API bounds a request's vectors before it runs, and this
bound keeps a worker's memory safe whatever the API counted.

A dashboard capture (`dashboard` in the spec) keeps no per-position record: every chunk is folded
into its batch's bounded per-feature accumulators (capture/dashboards.py).

Results are kept in the worker's WorkerStore (store.py), charged an estimate of the bytes
Python holds for them against its budget. A position is recorded once per request: rows a
preemption makes the engine compute again are left out by the runtime (StepCapture.recorded_below).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from steerserve_sae.capture.dashboards import DashboardAccumulator
from steerserve_sae.capture.store import WorkerStore
from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_STORE_MIB
from steerserve_sae.protocol.rpc import CAPTURES, trace_key
from steerserve_sae.sae import sae_math
from steerserve_sae.sae.autoencoder import SAEWeights

AGGREGATE_TOP = 20
# Rows encoded at once (here and by the PyTorch backend): at Qwen3.5-27B shapes (81,920
# features, 5,120 wide) one chunk needs at most ~0.4 GB of workspace, whatever the step's size.
ENCODE_CHUNK_ROWS = 256


def choice_index(req_id: str) -> int:
    """Which choice a request is: vLLM names the child requests of `n > 1` "{index}_{parent id}"."""
    head, sep, _ = req_id.partition("_")
    return int(head) if sep and head.isdigit() else 0


@dataclass
class _Quality:
    """Sums from which the reconstruction quality of a set of tokens follows (so results of
    several requests can be added up): FVU = sse / (sum_squares - |sum_x|^2 / tokens)."""

    tokens: int = 0
    sse: float = 0.0  # sum over tokens of |x - x_hat|^2
    sum_squares: float = 0.0  # sum of |x|^2
    sum_x: torch.Tensor | None = None  # [d_model] float64
    l0_sum: int = 0  # active features summed over tokens
    fired: torch.Tensor | None = None  # [d_sae] bool: active on at least one token

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, features: torch.Tensor) -> None:
        self.tokens += x.shape[0]
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_squares += float(x.pow(2).sum())
        row_sum = x.sum(dim=0).double()
        self.sum_x = row_sum if self.sum_x is None else self.sum_x + row_sum
        active = features > 0
        self.l0_sum += int(active.sum())
        fired = active.any(dim=0)
        self.fired = fired if self.fired is None else self.fired | fired

    def result(self) -> dict:
        return {"tokens": self.tokens, "sse": self.sse, "sum_squares": self.sum_squares,
                "sum_x": self.sum_x.tolist() if self.sum_x is not None else [], "l0_sum": self.l0_sum,
                "fired": self.fired.nonzero().flatten().tolist() if self.fired is not None else []}


@dataclass
class _LayerCapture:
    positions: list[int] = field(default_factory=list)
    indices: list[list[int]] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    watched: list[list[float]] = field(default_factory=list)  # per position, the watched features
    residuals: list[str | None] = field(default_factory=list)  # per position, its stream (None: over the bound)
    max: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    aggregated_positions: int = 0
    quality: _Quality | None = None


class StepCapture(NamedTuple):
    """A capturing request's rows in this step."""

    spec: CaptureSpec
    first_row: int
    rows: int
    first_position: int
    key: str  # where the result is kept: the capture id, or a trace's trace_key
    recorded_below: int = 0  # positions below it were recorded before (computed again after a preemption)

    @staticmethod
    def of_request(spec: CaptureSpec, req_id: str, first_row: int, rows: int, first_position: int,
                   num_prompt: int, recorded_below: int = 0) -> "StepCapture | None":
        """The rows this step records (or, splicing, edits) for a request (None: none of them)."""
        skip = max(0, min(rows, num_prompt - 1 - first_position)) if spec.generation_only else 0
        if not spec.splice:  # rows computed again need neither an encode nor a record
            skip = max(skip, min(rows, recorded_below - first_position))
        first_row, rows, first_position = first_row + skip, rows - skip, first_position + skip
        if rows <= 0:
            return None
        return StepCapture(spec, first_row, rows, first_position,
                           trace_key(spec.id, choice_index(req_id)) if spec.trace else spec.id, recorded_below)


class CaptureStore:
    def __init__(self, store: WorkerStore | None = None) -> None:
        self.store = store or WorkerStore(DEFAULT_MAX_STORE_MIB * 2**20)
        self._step: list[StepCapture] = []
        self.answers_dashboards = True  # False on tensor-parallel ranks after the first (vllm_hooks)

    def begin_step(self, step: list[StepCapture]) -> None:
        self._step = step

    def layers_this_step(self) -> set[int]:
        return {layer for capture in self._step for layer in capture.spec.layers}

    def record_layer(self, layer: int, sae: SAEWeights, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Features of this step's capturing rows in the stream `hidden + residual` at `layer`;
        for a splicing capture, those rows' stream then becomes the SAE's reconstruction (what
        the model computes downstream of an SAE that replaced the layer's output)."""
        for spec, start, n, first_position, key, recorded_below in self._step:
            if layer not in spec.layers:
                continue
            for lo in range(start, start + n, ENCODE_CHUNK_ROWS):
                hi = min(start + n, lo + ENCODE_CHUNK_ROWS)
                x = hidden[lo:hi].float() + residual[lo:hi].float()
                features = sae_math.encode(sae, x)
                x_hat = sae_math.decode(sae, features) if spec.quality or spec.splice else None
                position = first_position + lo - start
                new = max(0, min(hi - lo, recorded_below - position))  # rows before it were recorded already
                if spec.dashboard is not None:
                    if new < hi - lo:
                        self.record_dashboard(spec, layer, features[new:], position + new, key)
                    continue
                if new < hi - lo:
                    self.record(spec, layer, list(range(position + new, position + hi - lo)), features[new:],
                                (x[new:], x_hat[new:]) if spec.quality else None, key,
                                x[new:] if spec.residuals else None)
                if spec.splice:
                    hidden[lo:hi] = (x_hat - residual[lo:hi].float()).to(hidden.dtype)

    def record(self, spec: CaptureSpec, layer: int, positions: list[int], features: torch.Tensor,
               streams: tuple[torch.Tensor, torch.Tensor] | None = None, key: str | None = None,
               residual_rows: torch.Tensor | None = None) -> None:
        """features: dense activations [rows, d_sae] of the rows at `positions`; streams: those
        rows' residual stream and its SAE reconstruction, given when the capture accumulates
        reconstruction quality; key: where to keep it (default: the capture id); residual_rows:
        the rows' stream, for a trace that returns residuals. Nothing is recorded once the
        result outgrew the store's budget (its take says so)."""
        store_key = (CAPTURES, key or spec.id)
        stored = self.store.entry(store_key, dict)
        if stored.full:
            return
        layers: dict[int, _LayerCapture] = stored.value
        entry = layers.get(layer)
        room = max(0, spec.residuals - len(entry.residuals)) if entry is not None else spec.residuals
        stream = residual_rows if residual_rows is not None else streams[0] if streams is not None else None
        d_model = stream.shape[-1] if stream is not None else 0
        nbytes = _record_bytes(spec, len(positions), min(room, len(positions)), features.shape[-1], d_model,
                               new_layer=entry is None)
        if not self.store.charge(store_key, nbytes):
            return
        entry = layers.setdefault(layer, _LayerCapture())
        values, indices = features.topk(spec.top_k, dim=-1)
        entry.positions += positions
        entry.indices += indices.tolist()
        entry.values += values.float().tolist()
        if spec.watch:
            entry.watched += features[:, list(spec.watch)].float().tolist()
        if residual_rows is not None:
            rows = residual_rows[:room].float().cpu().numpy().astype("<f4")
            entry.residuals += [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
            entry.residuals += [None] * (len(positions) - len(rows))
        if spec.trace:  # no aggregate
            return
        keep = torch.tensor([p not in spec.exclude_from_aggregate for p in positions], device=features.device)
        counted = features[keep].float()
        if entry.max is None:
            zeros = torch.zeros(features.shape[-1], device=features.device)
            entry.max, entry.sum, entry.count = zeros.clone(), zeros.clone(), zeros.clone()
        if streams is not None and counted.shape[0]:
            entry.quality = entry.quality or _Quality()
            x, x_hat = streams
            entry.quality.add(x[keep], x_hat[keep], counted)
        if counted.shape[0]:
            entry.max = torch.maximum(entry.max, counted.max(dim=0).values)
            entry.sum += counted.sum(dim=0)
            entry.count += (counted > 0).sum(dim=0)
            entry.aggregated_positions += counted.shape[0]

    def record_dashboard(self, spec: CaptureSpec, layer: int, features: torch.Tensor, first_position: int,
                         key: str) -> None:
        """Fold a document's rows into the dashboard accumulator of its batch (capture/dashboards.py),
        charged once per layer for its fixed size."""
        store_key = (CAPTURES, key)
        stored = self.store.entry(store_key, dict)
        if stored.full:
            return
        layers: dict[int, DashboardAccumulator] = stored.value
        if layer not in layers:
            if not self.store.charge(store_key, DashboardAccumulator.nbytes(features.shape[-1], spec.dashboard)):
                return
            layers[layer] = DashboardAccumulator(features.shape[-1], spec.dashboard, features.device)
        rows = range(first_position, first_position + features.shape[0])
        counted = (torch.tensor([p not in spec.exclude_from_aggregate for p in rows], device=features.device)
                   if spec.exclude_from_aggregate else torch.ones(len(rows), dtype=torch.bool, device=features.device))
        layers[layer].add(features, spec.dashboard.doc, first_position, counted, spec.dashboard.group,
                          spec.dashboard.ungrouped)

    def take(self, capture_id: str) -> dict | None:
        """JSON-safe result per layer, positions in order; None if unknown (or dropped); the
        store's full marker (store.full_marker) if it outgrew the budget."""
        stored = self.store.take((CAPTURES, capture_id))
        if stored is None:
            return None
        if stored.full:
            return self.store.full_marker()
        if not self.answers_dashboards and any(isinstance(e, DashboardAccumulator) for e in stored.value.values()):
            return None  # a tensor-parallel peer holds the same numbers (protocol/dashboard_merge.py)
        return {layer: entry.result() if isinstance(entry, DashboardAccumulator) else _layer_result(entry)
                for layer, entry in stored.value.items()}


# What Python holds, roughly, per recorded row: list slots, ints and floats (CPython sizes), a
# list per row for its top-k indices and values (and watched features), a base64 string per residual.
_SLOT, _INT, _FLOAT, _LIST, _STR = 8, 28, 24, 56, 49


def _record_bytes(spec: CaptureSpec, rows: int, residual_rows: int, d_sae: int, d_model: int,
                  new_layer: bool) -> int:
    """Bytes a record of `rows` positions adds to a capture (estimated, see the sizes above)."""
    per_row = _SLOT + _INT + 2 * (_SLOT + _LIST) + spec.top_k * (2 * _SLOT + _INT + _FLOAT)
    if spec.watch:
        per_row += _SLOT + _LIST + len(spec.watch) * (_SLOT + _FLOAT)
    if spec.residuals:
        per_row += _SLOT
    fixed = 0
    if new_layer and not spec.trace:  # the aggregate's max, sum and count [d_sae] float32
        fixed += 3 * d_sae * 4
    if new_layer and spec.quality:  # sum_x [d_model] float64 and fired [d_sae] bool
        fixed += d_model * 8 + d_sae
    return rows * per_row + residual_rows * (_STR + 4 * -(-d_model * 4 // 3)) + fixed


def _layer_result(entry: _LayerCapture) -> dict:
    order = sorted(range(len(entry.positions)), key=entry.positions.__getitem__)
    result = {
        "positions": [entry.positions[i] for i in order],
        "indices": [entry.indices[i] for i in order],
        "values": [entry.values[i] for i in order],
        **({"watched": [entry.watched[i] for i in order]} if entry.watched else {}),
        **({"residuals": [entry.residuals[i] for i in order]} if entry.residuals else {}),
        **({"quality": entry.quality.result()} if entry.quality is not None else {}),
    }
    if entry.max is None:  # a trace: no aggregate
        return result
    n = max(entry.aggregated_positions, 1)
    mean = entry.sum / n

    def top(score: torch.Tensor) -> list[dict]:
        score = torch.where(entry.count > 0, score, torch.full_like(score, -1.0))
        k = min(AGGREGATE_TOP, int((entry.count > 0).sum()))
        idx = score.topk(k).indices.tolist() if k else []
        return [{"index": i, "max_activation": float(entry.max[i]), "mean_activation": float(mean[i]),
                 "count": int(entry.count[i])} for i in idx]

    return result | {"aggregate": {"num_tokens": entry.aggregated_positions, "by_max": top(entry.max),
                                   "by_mean": top(mean)}}
