"""Feature dashboards accumulated inside the serving forward, in bounded device memory.

A dashboard capture (protocol/capture.py: CaptureSpec.dashboard) is shared by a batch of
requests, one document each, under one capture id. At each captured layer every chunk of a
document's rows is encoded (dense [rows, d_sae] on the device, as for inspect) and folded into
per-feature accumulators whose size depends on d_sae, top_n and the window only, never on the
tokens seen:
  * tokens counted, firing count, activation sum and max per feature;
  * an activation histogram per feature over fixed log-spaced bins (one bincount per chunk);
  * a running top-N of documents per feature by their peak activation (a document holds at
    most one slot per feature: a later chunk of the same document replaces its own slot when it
    peaks higher), with the window of activations around the peak (`before` and `after` rows,
    within the chunk; NaN outside it);
  * with groups (DashboardSpec.groups), per group and feature the firing count on the group's
    counted tokens, and per group the tokens counted ([groups, d_sae]: still no tokens axis).
Nothing dense goes to the host: the take returns the rows of features that fired, as
little-endian bytes (DASHBOARD_ARRAYS says which).
"""

from __future__ import annotations

import math

import torch

from steerserve_sae.protocol.capture import DASHBOARD_ARRAYS, DashboardSpec


def histogram_bins(values: torch.Tensor, spec: DashboardSpec) -> torch.Tensor:
    """The bin of each positive activation: floor of its position between log10(low) and
    log10(high) in `bins` equal steps, clamped to the end bins (the reference recomputation in
    the tests uses this very rule)."""
    lo, hi = math.log10(spec.low), math.log10(spec.high)
    scaled = (values.double().log10() - lo) * (spec.bins / (hi - lo))
    return scaled.floor().clamp(0, spec.bins - 1).long()


class DashboardAccumulator:
    def __init__(self, d_sae: int, spec: DashboardSpec, device: torch.device):
        self.spec = spec
        n, w = spec.top_n, spec.window
        self.tokens = 0
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.hist = torch.zeros(d_sae * spec.bins, dtype=torch.int64, device=device)
        self.top_val = torch.zeros(d_sae, n, dtype=torch.float32, device=device)  # 0: an empty slot
        self.top_doc = torch.full((d_sae, n), -1, dtype=torch.int32, device=device)
        self.top_pos = torch.zeros(d_sae, n, dtype=torch.int32, device=device)
        self.top_win = torch.full((d_sae, n, w), math.nan, dtype=torch.float32, device=device)
        self.group_tokens = [0] * spec.groups
        self.group_fired = torch.zeros(d_sae, spec.groups, dtype=torch.int64, device=device)

    @staticmethod
    def nbytes(d_sae: int, spec: DashboardSpec) -> int:
        return d_sae * (8 + 8 + 4 + 8 * spec.bins + spec.top_n * (4 + 4 + 4 + 4 * spec.window) + 8 * spec.groups)

    def add(self, features: torch.Tensor, doc: int, first_position: int, counted: torch.Tensor, group: int = -1,
            ungrouped: frozenset[int] = frozenset()) -> None:
        """features: dense activations [rows, d_sae] of document `doc`'s consecutive rows from
        `first_position`; counted: [rows] bool, the rows that count (not special tokens); the
        document's group (-1: none) and its positions that do not count for the group."""
        f = features.float() * counted[:, None]
        rows, d_sae = f.shape
        self.tokens += int(counted.sum())
        active = f > 0
        self.fired += active.sum(0)
        self.sum += f.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, f.max(0).values)
        row_idx, feat_idx = active.nonzero(as_tuple=True)
        if feat_idx.numel():
            bins = histogram_bins(f[row_idx, feat_idx], self.spec)
            self.hist += torch.bincount(feat_idx * self.spec.bins + bins, minlength=d_sae * self.spec.bins)
        if 0 <= group < self.spec.groups:
            grouped = counted & torch.tensor([p not in ungrouped for p in range(first_position, first_position + rows)],
                                             device=f.device)
            self.group_tokens[group] += int(grouped.sum())
            self.group_fired[:, group] += (active & grouped[:, None]).sum(0)
        self._add_top(f, doc, first_position)

    def _add_top(self, f: torch.Tensor, doc: int, first_position: int) -> None:
        spec = self.spec
        peak, peak_row = f.max(0)  # per feature, this chunk's peak (the first row among ties)
        same = self.top_doc == doc
        slot = torch.where(same.any(1), same.int().argmax(1), self.top_val.argmin(1))
        replace = peak > self.top_val.gather(1, slot[:, None])[:, 0]
        feats = replace.nonzero(as_tuple=True)[0]
        if not feats.numel():
            return
        slots, rows = slot[feats], peak_row[feats]
        padded = torch.nn.functional.pad(f.T[feats], (spec.before, spec.after), value=math.nan)  # [n, rows + w - 1]
        window = padded.gather(1, rows[:, None] + torch.arange(spec.window, device=f.device))
        self.top_val[feats, slots] = peak[feats]
        self.top_doc[feats, slots] = doc
        self.top_pos[feats, slots] = (rows + first_position).int()
        self.top_win[feats, slots] = window

    def result(self) -> dict:
        """The features that fired (or hold an example), each array as bytes (DASHBOARD_ARRAYS)."""
        keep = ((self.fired > 0) | (self.top_val > 0).any(1)).nonzero(as_tuple=True)[0]
        arrays = {"features": keep.int(), "fired": self.fired[keep], "sum": self.sum[keep], "max": self.max[keep],
                  "hist": self.hist.view(-1, self.spec.bins)[keep], "top_val": self.top_val[keep],
                  "top_doc": self.top_doc[keep], "top_pos": self.top_pos[keep], "top_win": self.top_win[keep],
                  "group_fired": self.group_fired[keep]}
        return {"tokens": self.tokens, "top_n": self.spec.top_n, "bins": self.spec.bins, "window": self.spec.window,
                "before": self.spec.before, "groups": self.spec.groups, "group_tokens": self.group_tokens,
                **{name: array.cpu().numpy().astype(DASHBOARD_ARRAYS[name]).tobytes() for name, array in arrays.items()}}
