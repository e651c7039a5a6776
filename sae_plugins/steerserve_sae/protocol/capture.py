"""The capture spec: what an inspect request, or a completion's `trace`, asks the workers to
record. It travels signed (signing.py) in `extra_args[rpc.CAPTURE_KEY]`; the workers record as
capture/features.py describes and keep the result under the capture id (or, for a trace, under
rpc.trace_key per choice) until the API takes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from steerserve_sae.protocol import signing

# A residual vector as the API returns it: base64 of the d_model float32s, little-endian (the
# encoding of OpenAI's embeddings with encoding_format "base64").
RESIDUAL_ENCODING = "base64-float32-le"


# A dashboard take's arrays per layer (capture/dashboards.py), each little-endian bytes of this
# dtype, one row per feature that fired (hist [rows, bins], top_* [rows, top_n], top_win
# [rows, top_n, window], group_fired [rows, groups]).
DASHBOARD_ARRAYS = {"features": "<i4", "fired": "<i8", "sum": "<f8", "max": "<f4", "hist": "<i8",
                    "top_val": "<f4", "top_doc": "<i4", "top_pos": "<i4", "top_win": "<f4", "group_fired": "<i8"}


# What a dashboard spec may hold (the API refuses anything else with a 400 naming the field, the
# workers refuse it at receipt): histogram edges finite, positive and in a float32 activation's
# range, and bins at least MIN_BIN_DECADES of log10 wide, so every bin's width is computable.
DASHBOARD_BOUNDS = {"top_n": (1, 100), "before": (0, 64), "after": (0, 64), "bins": (1, 512)}
MIN_EDGE, MAX_EDGE = 1e-30, 1e30
MIN_BIN_DECADES = 1e-3
MAX_DOC = 2**31 - 1  # top examples keep the document id as int32


@dataclass(frozen=True)
class DashboardSpec:
    """A dashboard capture (capture/dashboards.py): many requests, one per document, add to one
    accumulator under the capture id; each request is document `doc`. Histogram bins are
    log-spaced, `bins` of them from `low` to `high` (values outside go to the end bins). A batch
    may sort its documents into `groups` (e.g. languages): the document is in group `group`
    (-1: none), and its positions in `ungrouped` do not count for it (e.g. tokens without a letter)."""

    doc: int
    top_n: int = 20
    before: int = 16  # tokens of context before an example's peak
    after: int = 7  # and after it
    bins: int = 56
    low: float = 1e-3
    high: float = 1e4
    groups: int = 0
    group: int = -1
    ungrouped: frozenset[int] = frozenset()

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def problem(self) -> tuple[str, str] | None:
        """(field, why) for the first value the accumulator cannot take; None when it fits."""
        for name, (low, high) in DASHBOARD_BOUNDS.items():
            if not low <= getattr(self, name) <= high:
                return name, f"{name} must be between {low} and {high}"
        for name in ("low", "high"):
            value = getattr(self, name)
            if not (math.isfinite(value) and MIN_EDGE <= value <= MAX_EDGE):
                return name, f"{name} must be a finite number between {MIN_EDGE:g} and {MAX_EDGE:g}"
        if (math.log10(self.high) - math.log10(self.low)) / self.bins < MIN_BIN_DECADES:
            return "high", (f"high must be above low by at least {MIN_BIN_DECADES:g} decades (log10) per bin, "
                            f"so that every bin has a width: {self.bins} bins from {self.low:g} need high >= "
                            f"{self.low * 10 ** (MIN_BIN_DECADES * self.bins):.6g}")
        if not 0 <= self.doc <= MAX_DOC or self.groups < 0 or not -1 <= self.group < self.groups:
            return "doc", "doc, groups or group out of range"
        return None

    def histogram_edges(self) -> list[float]:
        lo, hi = math.log10(self.low), math.log10(self.high)
        return [10 ** (lo + (hi - lo) * i / self.bins) for i in range(self.bins + 1)]

    def to_json(self) -> dict:
        return {"doc": self.doc, "top_n": self.top_n, "before": self.before, "after": self.after,
                "bins": self.bins, "low": self.low, "high": self.high, "groups": self.groups, "group": self.group,
                "ungrouped": sorted(self.ungrouped)}

    @staticmethod
    def from_json(data: dict) -> "DashboardSpec":
        return DashboardSpec(int(data["doc"]), int(data["top_n"]), int(data["before"]), int(data["after"]),
                             int(data["bins"]), float(data["low"]), float(data["high"]), int(data.get("groups", 0)),
                             int(data.get("group", -1)), frozenset(int(p) for p in data.get("ungrouped", ())))


@dataclass(frozen=True)
class CaptureSpec:
    id: str
    layers: tuple[int, ...]
    top_k: int
    exclude_from_aggregate: frozenset[int] = frozenset()  # positions (e.g. special tokens)
    quality: bool = False  # also accumulate reconstruction statistics (capture/features.py's _Quality)
    splice: bool = False  # replace the stream at the captured layers by the SAE's reconstruction
    watch: tuple[int, ...] = ()  # features whose activation is recorded at every position, top-k or not
    trace: bool = False  # a completion's trace: per choice, no aggregate
    generation_only: bool = False  # record from the last prompt position on (the generated tokens' predictors)
    residuals: int = 0  # a trace's stream vectors: most positions kept per layer and choice (0: none)
    dashboard: DashboardSpec | None = None  # accumulate feature dashboards instead of per-position records

    def to_extra_arg(self) -> str:
        return signing.sign(json.dumps(
            {"id": self.id, "layers": list(self.layers), "top_k": self.top_k,
             "exclude_from_aggregate": sorted(self.exclude_from_aggregate), "quality": self.quality,
             "splice": self.splice, "watch": list(self.watch), "trace": self.trace,
             "generation_only": self.generation_only, "residuals": self.residuals,
             "dashboard": self.dashboard.to_json() if self.dashboard else None}
        ))

    @staticmethod
    def from_extra_arg(raw: object) -> "CaptureSpec":
        data = json.loads(signing.verify(raw))
        return CaptureSpec(
            str(data["id"]), tuple(int(x) for x in data["layers"]), int(data["top_k"]),
            frozenset(int(p) for p in data.get("exclude_from_aggregate", ())), bool(data.get("quality", False)),
            bool(data.get("splice", False)), tuple(int(i) for i in data.get("watch", ())),
            bool(data.get("trace", False)), bool(data.get("generation_only", False)), int(data.get("residuals", 0)),
            DashboardSpec.from_json(data["dashboard"]) if data.get("dashboard") else None,
        )
