"""Direction-vector edits (spec.VectorEdit) as one rule the backends share.

Each vector edit that depends on the row is a pool direction `dir` and a coefficient
`c = min(offset + gain * (x . dir), upper)` on it, with x the residual stream as it arrived at
the layer: `x += gate * c * dir`.
  cap:    dir = u = v / |v|, c = min(value - x . u, 0)    (the projection held at most value)
  ablate: dir = u,           c = -(x . u)                   (the projection removed)
  add:    dir = v,           c = value                      (only a gated add; an ungated one
                                                             is folded into the config's add vector)
"""

from __future__ import annotations

import math

import torch

from steerserve_sae.protocol.spec import VectorEdit


def coefficients(edit: VectorEdit) -> tuple[float, float, float]:
    """(offset, gain, upper) of a projected vector edit."""
    if edit.mode == "cap":
        return edit.value, -1.0, 0.0
    if edit.mode == "ablate":
        return 0.0, -1.0, math.inf
    if edit.mode == "add":
        return edit.value, 0.0, math.inf
    raise ValueError(f"unknown vector mode {edit.mode!r}")


def direction(edit: VectorEdit) -> torch.Tensor:
    """The pool row of a projected vector edit (float32 [d_model])."""
    v = torch.from_numpy(edit.values())
    if edit.mode == "add":
        return v
    return v / torch.linalg.vector_norm(v.double()).float()


def added(edit: VectorEdit) -> torch.Tensor:
    """What an ungated `add` contributes to its config's add vector: value * v (float32)."""
    return edit.value * torch.from_numpy(edit.values())


def projected_coefficients(x: torch.Tensor, directions: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
    """c [rows, V] from float32 streams x [rows, d_model], directions [rows, V, d_model] and
    rules [rows, V, 3] (offset, gain, upper); padding entries are (0, 0, 0)."""
    offset, gain, upper = rule.unbind(-1)
    projection = torch.bmm(directions, x.unsqueeze(-1)).squeeze(-1)
    return torch.minimum(torch.addcmul(offset, gain, projection), upper)
