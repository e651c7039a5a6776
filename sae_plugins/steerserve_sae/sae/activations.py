"""The SAE activation functions, each defined once: what encode, the steering edit, captures
and the logit lens compute, and what the native CPU and Triton kernels implement.

Semantics follow the formats' own code (SAELens, EleutherAI sparsify, Qwen-Scope):
  * ReLU:     f = relu(pre)
  * JumpReLU: f = relu(pre) * (pre > threshold). SAELens' direct parameterisation can learn
              negative thresholds; the ReLU still applies, so f is never negative.
  * TopK:     the k largest pre-activations keep relu(pre), all others are 0. Top-k then ReLU
              (SAELens) and ReLU then top-k (sparsify, Qwen-Scope) agree except on which zeros
              are "kept", which changes no value.
TopK ties: exactly k features are kept per row. Among pre-activations equal to the row's k-th
largest, the lowest feature indices win. So feature i is kept iff
    #{j : pre_j > pre_i} + #{j < i : pre_j == pre_i} < k,
a rule that needs only counts (the kernels decide it without selecting anything) and is
deterministic (torch.topk's choice among ties is not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Activation:
    """f from the pre-activations `pre` [rows, d_sae] (float32 or the encoder's dtype)."""

    def dense(self, pre: torch.Tensor) -> torch.Tensor:
        """All activations, float32 [rows, d_sae]."""
        return self.gather(pre, None)

    def gather(self, pre: torch.Tensor, feature_ids: torch.Tensor | None) -> torch.Tensor:
        """Activations of `feature_ids` [rows, F] only (float32 [rows, F]), equal to
        `dense(pre).gather(-1, feature_ids)`; None means every feature."""
        raise NotImplementedError


def _pick(values: torch.Tensor, feature_ids: torch.Tensor | None) -> torch.Tensor:
    return values if feature_ids is None else values.gather(-1, feature_ids)


@dataclass(frozen=True)
class ReLU(Activation):
    def gather(self, pre, feature_ids):
        return _pick(pre, feature_ids).float().relu()


@dataclass(frozen=True, eq=False)
class JumpReLU(Activation):
    threshold: torch.Tensor  # [d_sae]

    def gather(self, pre, feature_ids):
        p = _pick(pre, feature_ids).float()
        threshold = self.threshold.float()
        threshold = threshold if feature_ids is None else threshold[feature_ids]
        return p.relu() * (p > threshold)


@dataclass(frozen=True)
class TopK(Activation):
    k: int

    def gather(self, pre, feature_ids):
        kept = self.kept(pre)
        return (_pick(pre, feature_ids).float() * _pick(kept, feature_ids)).relu()

    def kept(self, pre: torch.Tensor) -> torch.Tensor:
        """Bool [rows, d_sae]: the k features each row keeps (ties: lowest indices)."""
        k = min(self.k, pre.shape[-1])
        kth = pre.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        above = pre > kth
        tied = pre == kth
        room = k - above.sum(dim=-1, keepdim=True)  # tied features that still fit, lowest first
        return above | (tied & (tied.cumsum(dim=-1) <= room))


def activation_of(kind: str, *, k: int | None = None, threshold: torch.Tensor | None = None) -> Activation:
    if kind == "topk":
        assert k is not None
        return TopK(k)
    if kind == "jumprelu":
        assert threshold is not None
        return JumpReLU(threshold)
    if kind == "relu":
        return ReLU()
    raise ValueError(f"unknown SAE activation {kind!r}")
