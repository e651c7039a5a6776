"""Conditional (gated) edits: each request's count of tokens that passed its gates.

A gate (protocol/spec.py's Gate) passes at a row when its feature's activation there lies
strictly inside (above, below): spec.gate_passes, applied to a step's rows by `passes`. Backends
evaluate it at the gate's layer into the planner's `gate_state` (step_plan.py) and multiply the
gated edits' coefficients by it, inside the forward, with no host round trip. After the forward
the runtime reads the step's gate columns once (only on steps that route a gated request) and
adds up, per request that asked for a report, how many of its routed tokens passed each gate;
the API takes the report by id once the request is done, as inspect takes its capture. A token
is counted once (the runtime leaves out rows a preemption computes again), and only for the
gates whose layer this worker holds: a pipeline stage never writes the gate columns of another
stage's layers, so what its gate_state holds there is stale, and the API, taking the largest
count over ranks, must read 0 from it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from steerserve_sae.capture.store import WorkerStore
from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_STORE_MIB
from steerserve_sae.protocol.rpc import GATE_REPORTS, GateReport
from steerserve_sae.protocol.spec import gate_passes


def passes(activations: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """1.0 where the gate passes, else 0.0; bounds [..., 2] = (above, below)."""
    return gate_passes(activations, *bounds.unbind(-1)).float()


class GatedRows(NamedTuple):
    """A reporting request's rows in this step."""

    report_id: str
    local: np.ndarray  # [num_gates] bool: the gate's layer is on this worker (pipeline stage)
    first_row: int
    rows: int


class GateReports:
    """Per report id: routed tokens, and per gate column the tokens that passed."""

    def __init__(self, store: WorkerStore | None = None) -> None:
        self.store = store or WorkerStore(DEFAULT_MAX_STORE_MIB * 2**20)  # [1 + num_gates] int64 per report
        self._step: list[GatedRows] = []

    def begin_step(self, step: list[GatedRows]) -> None:
        self._step = step

    def end_step(self, gate_state: torch.Tensor, step_slots: np.ndarray) -> None:
        """Count this step's reporting rows (one device read, only when there are some)."""
        step = [r for r in self._step if r.rows > 0]
        self._step = []
        if not step:
            return
        width = max(r.local.size for r in step)
        routed = step_slots > 0
        # per row: routed, then whether it passed each gate column (and was routed); a zero row
        # at the end lets every request's row range end inside the array
        per_row = np.zeros((step_slots.size + 1, 1 + width), dtype=np.int64)
        per_row[:-1, 0] = routed
        per_row[:-1, 1:] = (gate_state[: step_slots.size, :width].cpu().numpy() > 0.5) & routed[:, None]
        bounds = np.array([(r.first_row, r.first_row + r.rows) for r in step]).ravel()
        sums = np.add.reduceat(per_row, bounds, axis=0)[::2]  # each request's rows, summed
        for (report_id, local, _, _), counts in zip(step, sums):
            counts = counts[: 1 + local.size]
            counts[1:] *= local
            key = (GATE_REPORTS, report_id)
            stored = self.store.entry(key, lambda: np.zeros_like(counts))
            if stored.full or (not stored.nbytes and not self.store.charge(key, counts.nbytes + _ARRAY_BYTES)):
                continue
            stored.value += counts

    def take(self, report_id: str) -> GateReport | dict | None:
        stored = self.store.take((GATE_REPORTS, report_id))
        if stored is None:
            return None
        if stored.full:
            return self.store.full_marker()
        return {"tokens": int(stored.value[0]), "passed": [int(c) for c in stored.value[1:]]}


_ARRAY_BYTES = 112  # a small numpy array's own size (sys.getsizeof less its data)
