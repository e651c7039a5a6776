"""Recording which SAE features fire on a request's tokens, inside the serving forward.

An inspect request carries a capture spec in `extra_args[CAPTURE_KEY]`. Each step the runtime
tells the store which rows of the step belong to capturing requests (`begin_step`); at each
captured layer the steering op hands over the stream after any steering edit there
(`record_layer`), which is encoded in chunks of ENCODE_CHUNK_ROWS rows (a bounded workspace)
and kept as each position's top-k features plus running per-feature max / sum / count for the
aggregate. The API process takes the result by capture id over collective RPC once the request
has finished. Chunked prefill simply records several times.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import request_signing, sae_math
from .sae import SAEWeights

CAPTURE_KEY = "steerserve_capture"
MAX_PENDING_CAPTURES = 256  # results nobody took (client gone) are dropped oldest first
AGGREGATE_TOP = 20
# Rows encoded at once (here and by the PyTorch backend): at Qwen3.5-27B shapes (81,920
# features, 5,120 wide) one chunk needs at most ~0.4 GB of workspace, whatever the step's size.
ENCODE_CHUNK_ROWS = 256


@dataclass(frozen=True)
class CaptureSpec:
    id: str
    layers: tuple[int, ...]
    top_k: int
    exclude_from_aggregate: frozenset[int] = frozenset()  # positions (e.g. special tokens)

    def to_extra_arg(self) -> str:
        return request_signing.sign(json.dumps(
            {"id": self.id, "layers": list(self.layers), "top_k": self.top_k,
             "exclude_from_aggregate": sorted(self.exclude_from_aggregate)}
        ))

    @staticmethod
    def from_extra_arg(raw: object) -> "CaptureSpec":
        data = json.loads(request_signing.verify(raw))
        return CaptureSpec(
            str(data["id"]), tuple(int(x) for x in data["layers"]), int(data["top_k"]),
            frozenset(int(p) for p in data.get("exclude_from_aggregate", ())),
        )


@dataclass
class _LayerCapture:
    positions: list[int] = field(default_factory=list)
    indices: list[list[int]] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    max: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    aggregated_positions: int = 0


class StepCapture(NamedTuple):
    """A capturing request's rows in this step."""

    spec: CaptureSpec
    first_row: int
    rows: int
    first_position: int


class CaptureStore:
    def __init__(self) -> None:
        self._captures: OrderedDict[str, tuple[CaptureSpec, dict[int, _LayerCapture]]] = OrderedDict()
        self._step: list[StepCapture] = []

    def begin_step(self, step: list[StepCapture]) -> None:
        self._step = step

    def layers_this_step(self) -> set[int]:
        return {layer for capture in self._step for layer in capture.spec.layers}

    def record_layer(self, layer: int, sae: SAEWeights, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Features of this step's capturing rows in the stream `hidden + residual` at `layer`."""
        for spec, start, n, first_position in self._step:
            if layer not in spec.layers:
                continue
            for lo in range(0, n, ENCODE_CHUNK_ROWS):
                hi = min(n, lo + ENCODE_CHUNK_ROWS)
                x = hidden[start + lo : start + hi].float() + residual[start + lo : start + hi].float()
                positions = list(range(first_position + lo, first_position + hi))
                self.record(spec, layer, positions, sae_math.encode(sae, x))

    def record(self, spec: CaptureSpec, layer: int, positions: list[int], features: torch.Tensor) -> None:
        """features: dense activations [rows, d_sae] of the rows at `positions`."""
        if spec.id not in self._captures:
            self._captures[spec.id] = (spec, {})
            while len(self._captures) > MAX_PENDING_CAPTURES:
                self._captures.popitem(last=False)
        entry = self._captures[spec.id][1].setdefault(layer, _LayerCapture())
        values, indices = features.topk(spec.top_k, dim=-1)
        entry.positions += positions
        entry.indices += indices.tolist()
        entry.values += values.float().tolist()
        keep = torch.tensor([p not in spec.exclude_from_aggregate for p in positions], device=features.device)
        counted = features[keep].float()
        if entry.max is None:
            zeros = torch.zeros(features.shape[-1], device=features.device)
            entry.max, entry.sum, entry.count = zeros.clone(), zeros.clone(), zeros.clone()
        if counted.shape[0]:
            entry.max = torch.maximum(entry.max, counted.max(dim=0).values)
            entry.sum += counted.sum(dim=0)
            entry.count += (counted > 0).sum(dim=0)
            entry.aggregated_positions += counted.shape[0]

    def take(self, capture_id: str) -> dict | None:
        """JSON-safe result per layer, positions in order; None if unknown (or dropped)."""
        item = self._captures.pop(capture_id, None)
        if item is None:
            return None
        _, layers = item
        return {layer: _layer_result(entry) for layer, entry in layers.items()}


def _layer_result(entry: _LayerCapture) -> dict:
    order = sorted(range(len(entry.positions)), key=entry.positions.__getitem__)
    n = max(entry.aggregated_positions, 1)
    mean = entry.sum / n

    def top(score: torch.Tensor) -> list[dict]:
        score = torch.where(entry.count > 0, score, torch.full_like(score, -1.0))
        k = min(AGGREGATE_TOP, int((entry.count > 0).sum()))
        idx = score.topk(k).indices.tolist() if k else []
        return [{"index": i, "max_activation": float(entry.max[i]), "mean_activation": float(mean[i]),
                 "count": int(entry.count[i])} for i in idx]

    return {
        "positions": [entry.positions[i] for i in order],
        "indices": [entry.indices[i] for i in order],
        "values": [entry.values[i] for i in order],
        "aggregate": {"num_tokens": entry.aggregated_positions, "by_max": top(entry.max), "by_mean": top(mean)},
    }
