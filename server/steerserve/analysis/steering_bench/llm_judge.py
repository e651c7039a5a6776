"""The LLM judge: any OpenAI-compatible chat endpoint rates each answer on AxBench's three 0-2
scales, one request per scale, with prompts written for this benchmark (below).

Each prompt asks for a short reason and then the rating as `Rating: [[N]]`. `parse_rating` takes
the last `[[N]]` with N in 0-2, else the last "Rating: N"; an answer with neither is unparseable:
that score is None, the row names it in `unparsed`, it gets no harmonic mean and the summary
counts it. An endpoint that cannot be reached, or answers with an HTTP error, is a JudgeError
(the run stops; what was scored is kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

SCALES = ("concept", "relevance", "fluency")
JUDGE_MAX_TOKENS = 300

_ANSWER = """Then, on its own last line, write `Rating: [[N]]` with N your rating: 0, 1 or 2."""
PROMPTS = {
    "concept": """You rate whether a piece of text shows a given concept.

Concept: {description}

Text:
<<<
{answer}
>>>

Rate how clearly the concept is present in the text:
2 = the concept is clearly and unmistakably there;
1 = there are traces or partial signs of it, but it is weak, mixed or only implied;
0 = it is absent, or the text is empty or gibberish.
Judge only the concept's presence, not quality, helpfulness or grammar. Give one sentence of reason.
""" + _ANSWER,
    "relevance": """You rate whether a response still answers the instruction it was given, however
it is worded and whatever else it talks about.

Instruction:
<<<
{instruction}
>>>

Response:
<<<
{answer}
>>>

2 = it addresses the instruction (a reasonable reply to it, in any language or style);
1 = it touches the instruction's subject only loosely or in part;
0 = it is unrelated to the instruction, empty or gibberish.
Do not judge grammar or fluency. Give one sentence of reason.
""" + _ANSWER,
    "fluency": """You rate the fluency of a text: is it well-formed, natural language?

Text:
<<<
{answer}
>>>

2 = fluent: grammatical, coherent sentences a native speaker could write (in any language);
1 = partly fluent: understandable but with broken grammar, odd repetition or abrupt fragments;
0 = not fluent: word salad, endless repetition, or no language at all.
Do not judge content, truth or relevance. Give one sentence of reason.
""" + _ANSWER,
}
_BRACKETS = re.compile(r"\[\[\s*([0-2])\s*\]\]")
_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*([0-2])(?![\d.])", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint could not be asked (unreachable, or an HTTP error)."""


def parse_rating(text: str) -> int | None:
    """The 0-2 rating in a judge's answer (see the module's docstring), or None."""
    found = _BRACKETS.findall(text) or _RATING.findall(text)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class Verdict:
    scores: dict[str, int | None]  # per scale; None where the answer was unparseable
    unparsed: tuple[str, ...]
    raw: dict[str, str]  # the judge's answers, kept for audit


class LLMJudge:
    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float = 300):
        self.name = f"llm:{model}"
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})

    def close(self) -> None:
        self.http.close()

    def _ask(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": JUDGE_MAX_TOKENS}
        try:
            response = self.http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise JudgeError(f"the judge at {self.base_url} cannot be reached: {exc}") from None
        if response.status_code != 200:
            raise JudgeError(f"the judge at {self.base_url} answered {response.status_code}: {response.text[:300]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"the judge at {self.base_url} answered no chat completion: {response.text[:300]}") from None

    def judge(self, instruction: str, description: str, answer: str) -> Verdict:
        raw = {scale: self._ask(PROMPTS[scale].format(description=description, instruction=instruction, answer=answer))
               for scale in SCALES}
        scores = {scale: parse_rating(text) for scale, text in raw.items()}
        return Verdict(scores, tuple(s for s in SCALES if scores[s] is None), raw)
