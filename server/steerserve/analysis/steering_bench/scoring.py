"""The benchmark's arithmetic, kept apart from HTTP so tests can pin it exactly.

- `harmonic`: AxBench's score, the harmonic mean of the 0-2 scores judged (concept, instruction
  relevance, fluency), 0 when any is 0; without an LLM judge relevance is not judged, and the
  mean is over concept and fluency only (the report labels it so).
- `split`: instructions go, by a seeded shuffle of their sorted ids, into a selection half (the
  larger when odd) and a report half.
- `choose_strength`: the strength with the best mean score on the selection half (ties: the
  smallest strength, the gentlest edit that does as well).
- `bootstrap`: a percentile interval of the mean over report-half instructions, resampling
  instructions with replacement, seeded.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SELECTION, REPORT = "selection", "report"
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


def harmonic(scores: Iterable[int | float | None]) -> float:
    """Harmonic mean of the scores that were judged (None: not judged); 0 when any is 0."""
    judged = [s for s in scores if s is not None]
    if not judged:
        raise ValueError("no score was judged")
    if any(s == 0 for s in judged):
        return 0.0
    return len(judged) / sum(1 / s for s in judged)


def split(ids: Iterable[str], seed: int) -> dict[str, str]:
    """Each instruction id -> SELECTION or REPORT."""
    order = sorted(set(ids))
    random.Random(seed).shuffle(order)
    half = (len(order) + 1) // 2
    return {ident: SELECTION if n < half else REPORT for n, ident in enumerate(order)}


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def choose_strength(by_strength: dict[float, list[float]]) -> float:
    """The strength whose selection-half scores have the highest mean (ties: the smallest);
    strengths with no scored answer are not candidates."""
    candidates = [(mean(scores), s) for s, scores in by_strength.items() if scores]
    if not candidates:
        raise ValueError("no strength has a scored answer on the selection half")
    best = max(m for m, _ in candidates)
    return min(s for m, s in candidates if m == best)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def bootstrap(values: Sequence[float], seed: int, samples: int = BOOTSTRAP_SAMPLES,
              confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` (one per instruction) and its percentile bootstrap interval: of the
    sorted means of `samples` resamples, the ones at ranks round(samples * (1 - confidence) / 2)
    and samples - 1 minus that."""
    if not values:
        raise ValueError("nothing to bootstrap")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    cut = round(samples * (1 - confidence) / 2)
    return Interval(sum(values) / n, means[cut], means[samples - 1 - cut])
