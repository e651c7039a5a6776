"""Conditional (gated) edits: the pass rule, and each request's count of tokens that passed.

A gate (steering_spec.Gate) passes at a row when its feature's activation there lies strictly
inside (above, below). Backends evaluate it at the gate's layer into the planner's `gate_state`
(step_plan.py) and multiply the gated edits' coefficients by it, inside the forward, with no
host round trip. After the forward the runtime reads the step's gate columns once (only on
steps that route a gated request) and adds up, per request that asked for a report, how many of
its routed tokens passed each gate; the API takes the report by id once the request is done,
as inspect takes its capture.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from . import request_signing

GATE_REPORT_KEY = "steerserve_gate_report"
MAX_PENDING_REPORTS = 4096  # reports nobody took (client gone) are dropped oldest first


def passes(activations: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """1.0 where above < activation < below, else 0.0; bounds [..., 2] = (above, below)."""
    above, below = bounds.unbind(-1)
    return ((activations > above) & (activations < below)).float()


def report_extra_arg(report_id: str) -> str:
    return request_signing.sign(json.dumps({"id": report_id}))


def report_id_from_extra_arg(raw: object) -> str:
    return str(json.loads(request_signing.verify(raw))["id"])


class GatedRows(NamedTuple):
    """A reporting request's rows in this step."""

    report_id: str
    num_gates: int
    first_row: int
    rows: int


class GateReports:
    """Per report id: routed tokens, and per gate column the tokens that passed."""

    def __init__(self) -> None:
        self._reports: OrderedDict[str, np.ndarray] = OrderedDict()  # [1 + num_gates] int64
        self._step: list[GatedRows] = []

    def begin_step(self, step: list[GatedRows]) -> None:
        self._step = step

    def end_step(self, gate_state: torch.Tensor, step_slots: np.ndarray) -> None:
        """Count this step's reporting rows (one device read, only when there are some)."""
        step = [r for r in self._step if r.rows > 0]
        self._step = []
        if not step:
            return
        width = max(r.num_gates for r in step)
        routed = step_slots > 0
        # per row: routed, then whether it passed each gate column (and was routed); a zero row
        # at the end lets every request's row range end inside the array
        per_row = np.zeros((step_slots.size + 1, 1 + width), dtype=np.int64)
        per_row[:-1, 0] = routed
        per_row[:-1, 1:] = (gate_state[: step_slots.size, :width].cpu().numpy() > 0.5) & routed[:, None]
        bounds = np.array([(r.first_row, r.first_row + r.rows) for r in step]).ravel()
        sums = np.add.reduceat(per_row, bounds, axis=0)[::2]  # each request's rows, summed
        for (report_id, num_gates, _, _), counts in zip(step, sums):
            counts = counts[: 1 + num_gates]
            if report_id in self._reports:
                self._reports[report_id] += counts
            else:
                self._reports[report_id] = counts.copy()
                while len(self._reports) > MAX_PENDING_REPORTS:
                    self._reports.popitem(last=False)

    def take(self, report_id: str) -> dict | None:
        counts = self._reports.pop(report_id, None)
        if counts is None:
            return None
        return {"tokens": int(counts[0]), "passed": [int(c) for c in counts[1:]]}
