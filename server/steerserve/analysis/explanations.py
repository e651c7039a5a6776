"""`steerserve dashboards --explain...`: a one-line explanation per feature from an
OpenAI-compatible chat endpoint (the dashboards' own server by default), and a detection score.

The explainer sees some of a feature's top examples (the even-ranked ones), each as text with
the peak token marked «so» and its activation. The score asks the same endpoint, one context at
a time, whether the explanation applies, reading P(yes) from the first answer token's
`top_logprobs` (the parsed answer when they are missing), and compares the held-out top
examples (the odd-ranked ones) with random contexts: windows of other documents, i.e. documents
outside the feature's top examples. README "Explanations" gives the exact definition.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from steerserve.analysis import explanation_store
from steerserve.analysis.dashboard_store import DashboardStore
from steerserve.analysis.explanation_store import Explanation

COMMIT_EVERY = 16
EXPLAIN_TOKENS = 48  # the explanation's max_tokens; its first line is kept, at most MAX_TEXT characters
MAX_TEXT = 200
DEFAULT_CHARS = 4000  # prompt budget when the endpoint does not list max_model_len


class ExplainError(RuntimeError):
    """The endpoint is unreachable, refused the run (not one prompt) or answered something else."""


class PromptRefused(ExplainError):
    """A 400 for one feature's prompt (e.g. longer than the model's context): recorded, not fatal."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("explanations (optional)")
    g.add_argument("--explain", action="store_true", help="explain features with the dashboards' own server")
    g.add_argument("--explain-with", metavar="URL",
                   help="an OpenAI-compatible base URL (implies --explain; default: none, the dashboards' own server)")
    g.add_argument("--explain-model", metavar="NAME", help="its model (default: its first listed; implies --explain)")
    g.add_argument("--explain-api-key", metavar="KEY",
                   help="key for --explain-with (default: $OPENAI_API_KEY; the own server gets the key its client sends)")
    g.add_argument("--explain-limit", type=_at_least(1), metavar="N", default=None,
                   help="explain the N most often firing features (default: all with top examples)")
    g.add_argument("--explain-examples", type=_at_least(1), metavar="N", default=5,
                   help="top examples shown to the explainer")
    g.add_argument("--explain-held-out", type=_at_least(0), metavar="N", default=5,
                   help="held-out top examples scored")
    g.add_argument("--explain-random", type=_at_least(0), metavar="N", default=5,
                   help="random contexts scored")
    g.add_argument("--explain-workers", type=_at_least(1), metavar="N", default=4,
                   help="features explained at once")


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, not {text!r}")
        return value
    return parse


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.explain or args.explain_with or args.explain_model)


def detection_score(held_out: list[float], randoms: list[float]) -> float | None:
    """P(a held-out example scores above a random context), ties counting half (an AUC)."""
    if not held_out or not randoms:
        return None
    wins = sum(1.0 if h > r else 0.5 if h == r else 0.0 for h in held_out for r in randoms)
    return wins / (len(held_out) * len(randoms))


def yes_probability(choice: dict) -> float:
    """P(yes) / (P(yes) + P(no)) over the first answer token's top_logprobs (tokens compared
    stripped and lower-cased); without either there, 1 / 0 / 0.5 for an answer text starting
    with yes / no / anything else."""
    content = (choice.get("logprobs") or {}).get("content") or []
    tops = (content[0].get("top_logprobs") or []) if content else []
    mass = {word: sum(math.exp(t["logprob"]) for t in tops if t["token"].strip().lower() == word)
            for word in ("yes", "no")}
    if mass["yes"] + mass["no"] > 0:
        return mass["yes"] / (mass["yes"] + mass["no"])
    text = (choice.get("message", {}).get("content") or "").strip().lower()
    return 1.0 if text.startswith("yes") else 0.0 if text.startswith("no") else 0.5


def _plain(tokens: list[str]) -> str:
    return "".join(tokens).replace("\n", " ").strip()


def marked(example: dict) -> str:
    """The example's text with its peak token in «», then the peak activation."""
    acts, tokens = example["activations"], example["tokens"]
    p = max(range(len(acts)), key=acts.__getitem__)
    text = "".join(tokens[:p]) + "«" + tokens[p] + "»" + "".join(tokens[p + 1:])
    return f"{text.replace(chr(10), ' ').strip()} ({acts[p]:.2f})"


def explain_prompt(examples: list[dict], budget: int) -> str:
    """The explainer's prompt: as many of the examples as fit in `budget` characters (at least one)."""
    head = "Texts where one feature fires; «» marks the strongest token, its activation in ().\n"
    tail = "In one short line, what does the feature detect?"
    lines: list[str] = []
    for n, example in enumerate(examples, start=1):
        line = f"{n}. {marked(example)}\n"
        if lines and len(head) + sum(map(len, lines)) + len(line) + len(tail) > budget:
            break
        lines.append(line)
    return head + "".join(lines) + tail


def detect_prompt(explanation: str, context: str) -> str:
    return (f"Feature: {explanation}\nText: {context}\n"
            "Does the feature fit this text? Answer yes or no.")


@dataclass
class Endpoint:
    client: httpx.Client
    url: str  # the base URL, ending in /v1 (named in errors)
    model: str
    budget: int  # prompt characters
    key: str | None
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def chat(self, content: str, **options) -> dict:
        """The first choice of a temperature-0 chat completion."""
        with self._lock:
            self.requests += 1
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0, **options}
        reply = self._call("POST", "/chat/completions", body)
        try:
            return reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise ExplainError(self._hide(f"{self.url}/chat/completions answered 200 without choices: "
                                          f"{str(reply)[:200]}")) from None

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.url + path
        try:
            r = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ExplainError(self._hide(f"{url} is unreachable ({type(exc).__name__}: {exc})")) from None
        if r.status_code == 400 and method == "POST":
            raise PromptRefused(self._hide(f"{url} answered 400: {r.text[:300]}"))
        if r.status_code != 200:
            raise ExplainError(self._hide(f"{url} answered {r.status_code}: {r.text[:300]}"))
        try:
            return r.json()
        except ValueError:
            raise ExplainError(self._hide(f"{url} answered 200 with a body that is not JSON: {r.text[:200]!r}")) from None

    def _hide(self, message: str) -> str:
        return message.replace(self.key, "***") if self.key else message


def connect(args: argparse.Namespace, http: httpx.Client) -> Endpoint:
    """The endpoint of --explain-with (or the dashboards' server), its model and prompt budget:
    half a character per token of max_model_len after the answer (byte-level tokens of non-Latin
    text are often more than one per character)."""
    if args.explain_with:
        url = args.explain_with.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        key = args.explain_api_key or os.environ.get("OPENAI_API_KEY") or None
        client = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"} if key else {})
    else:
        url, key = str(http.base_url).rstrip("/") + "/v1", None
        client = httpx.Client(base_url=url, timeout=300, headers=http.headers)
    endpoint = Endpoint(client, url, args.explain_model or "", DEFAULT_CHARS, key)
    models = endpoint._call("GET", "/models").get("data") or []
    card = next((m for m in models if m.get("id") == args.explain_model), None) if args.explain_model else (
        models[0] if models else None)
    if card is None and not args.explain_model:
        raise ExplainError(f"{url}/models lists no model; give --explain-model")
    endpoint.model = args.explain_model or card["id"]
    if card and card.get("max_model_len"):
        endpoint.budget = (int(card["max_model_len"]) - EXPLAIN_TOKENS) // 2
    return endpoint


def explain_feature(endpoint: Endpoint, layer: int, index: int, examples: list[dict], pool: dict[int, list[str]],
                    args: argparse.Namespace) -> Explanation:
    shown, held = examples[0::2][: args.explain_examples], examples[1::2][: args.explain_held_out]
    own = {e["doc"] for e in examples}
    others = sorted(d for d in pool if d not in own)
    randoms = random.Random(f"{layer}:{index}").sample(others, min(args.explain_random, len(others)))
    try:
        answer = endpoint.chat(explain_prompt(shown, endpoint.budget), max_tokens=EXPLAIN_TOKENS)
        lines = [line.strip() for line in (answer.get("message", {}).get("content") or "").splitlines()]
        text = next((line for line in lines if line), "")[:MAX_TEXT]
        if not text:
            return Explanation(layer, index, None, endpoint.model, None, 0, 0, "the explainer answered nothing")

        def judged(tokens: list[str]) -> float:
            return yes_probability(endpoint.chat(detect_prompt(text, _plain(tokens)[: endpoint.budget // 2]),
                                                 max_tokens=1, logprobs=True, top_logprobs=20))

        score = detection_score([judged(e["tokens"]) for e in held], [judged(pool[d]) for d in randoms])
        return Explanation(layer, index, text, endpoint.model, score, len(held), len(randoms), None)
    except PromptRefused as exc:
        return Explanation(layer, index, None, endpoint.model, None, 0, 0, str(exc))


def run(args: argparse.Namespace, http: httpx.Client, store: DashboardStore, layers: list[int]) -> dict:
    """Explain the most often firing features that have top examples and no explanation yet,
    committing every COMMIT_EVERY; ExplainError (after committing what finished) if the
    endpoint fails."""
    endpoint = connect(args, http)
    features = {(layer, idx): f for layer in layers for idx, f in store.features(layer).items() if f.examples}
    ranked = sorted(features, key=lambda k: (-features[k].fired, k))[: args.explain_limit]
    done = explanation_store.explained(store.db)
    todo = [k for k in ranked if k not in done]
    pool: dict[int, list[str]] = {}  # one window per document: the random contexts
    for key in sorted(features):
        for e in features[key].examples:
            pool.setdefault(e["doc"], e["tokens"])
    started, results, pending = time.monotonic(), [], []
    executor = ThreadPoolExecutor(args.explain_workers)
    try:
        futures = [executor.submit(explain_feature, endpoint, *k, features[k].examples, pool, args) for k in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="explanations", unit="feature",
                           file=sys.stderr):
            pending.append(future.result())
            results.append(pending[-1])
            if len(pending) >= COMMIT_EVERY:
                explanation_store.put(store.db, pending)
                pending = []
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        explanation_store.put(store.db, pending)
        endpoint.client.close()
    seconds = time.monotonic() - started
    scores = [r.score for r in results if r.score is not None]
    failed = [r for r in results if r.text is None]
    if results and len(failed) == len(results):
        raise ExplainError(f"no feature was explained; the first failure: {failed[0].error}")
    return {"model": endpoint.model, "url": endpoint.url, "explained": len(results) - len(failed),
            "failed": len(failed), "already_explained": len(ranked) - len(todo), "requests": endpoint.requests,
            "mean_detection_score": round(sum(scores) / len(scores), 4) if scores else None,
            "seconds": round(seconds, 2), "seconds_per_feature": round(seconds / len(results), 3) if results else None}
