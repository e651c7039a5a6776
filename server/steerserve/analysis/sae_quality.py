"""How well an SAE reconstructs the residual stream, from the sums a capture accumulates.

The workers add up, per layer, over the tokens they saw: |x - x_hat|^2, |x|^2, x itself, the
number of active features and which features fired (sae_plugins/steerserve_sae/capture/features.py). Sums of
several requests add up, so inspect reports one text's quality and `steerserve eval` a whole
text set's with the same code:
  FVU (fraction of variance unexplained) = sum |x - x_hat|^2 / sum |x - mean(x)|^2
  L0 = mean number of active features per token
  dead fraction = share of features that fired on no token
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class QualitySums:
    tokens: int = 0
    sse: float = 0.0
    sum_squares: float = 0.0
    sum_x: list[float] = field(default_factory=list)
    l0_sum: int = 0
    fired: set[int] = field(default_factory=set)

    @staticmethod
    def from_capture(raw: dict) -> "QualitySums":
        return QualitySums(raw["tokens"], raw["sse"], raw["sum_squares"], list(raw["sum_x"]), raw["l0_sum"],
                           set(raw["fired"]))

    def __add__(self, other: "QualitySums") -> "QualitySums":
        sum_x = [a + b for a, b in zip(self.sum_x, other.sum_x)] if self.sum_x else list(other.sum_x)
        return QualitySums(self.tokens + other.tokens, self.sse + other.sse, self.sum_squares + other.sum_squares,
                           sum_x, self.l0_sum + other.l0_sum, self.fired | other.fired)

    def fvu(self) -> float | None:
        if self.tokens < 2:
            return None
        variance = self.sum_squares - sum(v * v for v in self.sum_x) / self.tokens
        return self.sse / variance if variance > 0 else None

    def summary(self, d_sae: int) -> dict:
        return {"tokens": self.tokens, "fvu": self.fvu(), "l0": self.l0_sum / self.tokens if self.tokens else None,
                "features_fired": len(self.fired), "dead_fraction": 1 - len(self.fired) / d_sae}


def kl_top_k(p: dict[str, float], q: dict[str, float], k: int) -> float:
    """KL(P || Q) in nats at one position, from each run's top-k next-token log-probabilities
    (vLLM returns only the top k, plus the actual token).

    P's listed tokens count exactly where Q lists them too; where Q does not, the token gets
    Q's k-th log-probability (the most it can have, so that term is not overestimated); P's
    unlisted mass is one bucket against Q's remaining mass. Exact when P's top k hold all its
    mass and Q lists them; an estimate otherwise, good when the distributions are peaked.
    """
    q_floor = sorted(q.values(), reverse=True)[min(k, len(q)) - 1]
    kl, p_rest, q_rest = 0.0, 1.0, 1.0
    for token, lp in p.items():
        lq = q.get(token, q_floor)
        kl += math.exp(lp) * (lp - lq)
        p_rest -= math.exp(lp)
        q_rest -= math.exp(lq)
    if p_rest > 1e-9:
        kl += p_rest * math.log(p_rest / max(q_rest, 1e-12))
    return max(kl, 0.0)
