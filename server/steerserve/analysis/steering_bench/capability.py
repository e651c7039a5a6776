"""`--capability FILE`: what a concept's calibrated steering costs on multiple-choice questions
(JSONL `{"id", "question", "choices": [...], "answer": index}`), scored with no judge: the chosen
choice is the one whose tokens, after the question's and a space, have the highest mean
log-likelihood (prompt log-probabilities of `POST /v1/completions`, steered as the concept's
best method at its chosen strength, or unsteered).

The built-in set (capability.jsonl) is 20 proverb endings, 5 in each of the default model's
languages, each against two absurd endings: it shows whether steering makes the model lose the
sayings its corpus is full of (a language-model capability, measured the way MMLU-style losses
are), not reasoning or knowledge beyond its corpus, and 20 items give a coarse accuracy
(one item is 5 points).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from steerserve.analysis.steering_bench.calibration import best_method
from steerserve.analysis.steering_bench.inputs import BenchInputError, _lines
from steerserve.analysis.steering_bench.methods import Steered

BUILTIN_CAPABILITY = Path(__file__).with_name("capability.jsonl")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


def read_questions(path: Path) -> list[Question]:
    questions = []
    for number, row in _lines(path):
        where = f"{path}:{number}"
        choices, answer = row.get("choices"), row.get("answer")
        if set(row) != {"id", "question", "choices", "answer"}:
            raise BenchInputError(f"{where}: a question is {{\"id\", \"question\", \"choices\", \"answer\"}}")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise BenchInputError(f"{where}: question must be a non-empty string")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise BenchInputError(f"{where}: choices must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise BenchInputError(f"{where}: answer must be the index of the right choice (0 to {len(choices) - 1})")
        questions.append(Question(str(row["id"]), row["question"], tuple(choices), answer))
    return questions


def _tokens(http: httpx.Client, model: str, text: str) -> list[int]:
    response = http.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
    if response.status_code != 200:
        raise BenchInputError(f"tokenizing {text!r}: the server answered {response.status_code}: {response.text[:300]}")
    return response.json()["tokens"]


def choice_loglik(http: httpx.Client, model: str, question: str, choice: str, steering: dict | None) -> float:
    """Mean log-probability of the choice's tokens after the question's."""
    prefix, tail = _tokens(http, model, question), _tokens(http, model, " " + choice)
    ids = prefix + tail
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    if steering is not None:
        body["steering"] = steering
    response = http.post("/v1/completions", json=body)
    if response.status_code != 200:
        raise BenchInputError(f"scoring a choice: the server answered {response.status_code}: {response.text[:300]}")
    logprobs = response.json()["choices"][0]["prompt_logprobs"]
    return sum(logprobs[p][str(ids[p])]["logprob"] for p in range(len(prefix), len(ids))) / len(tail)


def accuracy(http: httpx.Client, model: str, questions: list[Question], steering: dict | None,
             concurrency: int) -> float:
    def right(q: Question) -> bool:
        scores = [choice_loglik(http, model, q.question, c, steering) for c in q.choices]
        return scores.index(max(scores)) == q.answer

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(right, questions)) / len(questions)


def measure(http: httpx.Client, model: str, questions: list[Question], steered: list[Steered], summary: dict,
            concurrency: int) -> dict:
    """Accuracy unsteered and under each concept's best method at its chosen strength."""
    result = {"questions": len(questions), "unsteered": accuracy(http, model, questions, None, concurrency),
              "steered": {}}
    for s in steered:
        methods = summary["concepts"][s.concept.name]["methods"]
        method = best_method(methods, s.swept)
        if method is not None:
            strength = methods[method]["strength"]
            result["steered"][s.concept.name] = {
                "method": method, "strength": strength,
                "accuracy": accuracy(http, model, questions, s.spec(method, strength, ()), concurrency)}
    return result
