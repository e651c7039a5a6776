"""Judges that need no second model, so the benchmark runs offline on the served model itself.
Both read the answer with no steering, as a text of its own: a newline and the answer (the
newline keeps a one-token answer from being a one-token prompt, and position 0, where
activations are outliers, is not counted). An answer with no text scores 0 on both.

- Concept, by feature firing (for concepts without an exact judge): the share of the answer's
  tokens at which any of the concept's own features fires (activation > 0) when the server
  re-reads it (`POST /v1/features/inspect` with `watch`): 2 at FIRING_HIGH or more, 1 at
  FIRING_LOW or more, else 0. (The default model's German feature fires on about half of a German
  text's tokens and on a few percent of others'.)
- Fluency, by likelihood: the answer's mean per-token negative log-likelihood under the unsteered
  model (prompt log-probabilities of `POST /v1/completions`), minus the mean of the same over the
  run's unsteered answers: 2 at most FLUENT_NATS above it (perplexity x1.65), 1 at most
  PARTLY_FLUENT_NATS above (x4.5), else 0. A fluent answer in another language than the model
  expects is not penalised by its instruction: the answer is read without it.
The language concept judge is language_judge.py's.
"""

from __future__ import annotations

import httpx

FIRING_HIGH, FIRING_LOW = 0.3, 0.1
FLUENT_NATS, PARTLY_FLUENT_NATS = 0.5, 1.5


class ServerJudgeError(RuntimeError):
    """The served model refused to re-read an answer."""


def _text(answer: str) -> str | None:
    return "\n" + answer if answer.strip() else None


def _ok(response: httpx.Response, what: str) -> dict:
    if response.status_code != 200:
        raise ServerJudgeError(f"{what}: the server answered {response.status_code}: {response.text[:300]}")
    return response.json()


def firing_share(http: httpx.Client, answer: str, features: tuple[tuple[int, int], ...]) -> float:
    """The share of the answer's tokens at which any of `features` (layer, index) fires."""
    text = _text(answer)
    if text is None:
        return 0.0
    layers = sorted({layer for layer, _ in features})
    watch = sorted({index for _, index in features})
    result = _ok(http.post("/v1/features/inspect", json={"prompt": text, "layers": layers, "top_k": 1,
                                                         "watch": watch}), "re-reading an answer")
    tokens = [t for t in result["tokens"][1:] if not t["special"]]
    fired = sum(any(token["watched"][str(layer)][watch.index(index)]["activation"] > 0 for layer, index in features)
                for token in tokens)
    return fired / len(tokens) if tokens else 0.0


def firing_score(share: float) -> int:
    return 2 if share >= FIRING_HIGH else 1 if share >= FIRING_LOW else 0


def answer_nll(http: httpx.Client, model: str, answer: str) -> float | None:
    """Mean per-token NLL of the answer under the unsteered model; None for no text."""
    text = _text(answer)
    if text is None:
        return None
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
            "return_token_ids": True}
    choice = _ok(http.post("/v1/completions", json=body), "scoring an answer's likelihood")["choices"][0]
    ids, logprobs = choice["prompt_token_ids"], choice["prompt_logprobs"]
    nll = [-logprobs[p][str(ids[p])]["logprob"] for p in range(1, len(ids))]
    return sum(nll) / len(nll) if nll else None


def fluency_score(nll: float | None, baseline: float) -> int:
    if nll is None:
        return 0
    excess = nll - baseline
    return 2 if excess <= FLUENT_NATS else 1 if excess <= PARTLY_FLUENT_NATS else 0
