"""Measure language steering on a running server: clamp a language feature and count how many
answers to prompts in another language come out in the feature's language.

The judge (`identify`) lives with the steering benchmark (steerserve's
analysis/steering_bench/language_judge.py, whose docstring says how it decides).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from steerserve.analysis.steering_bench.language_judge import identify

ENGLISH_PROMPTS = (
    "Tell me something.", "Say something wise.", "Tell me a joke.", "Give me a quote.",
    "What is the meaning of life?", "Tell me about love.", "What do you think of computers?",
    "Give me some advice.", "Say something funny.", "Tell me about the weather.",
    "What is a friend?", "Tell me a story.", "What should I do today?", "Tell me about work.",
    "Say something about money.", "What is happiness?", "Tell me about food.",
    "What do you know about cats?", "Tell me something true.", "Describe the sea.",
)

GERMAN_PROMPTS = (
    "Erzähl mir etwas.", "Sag etwas Kluges.", "Erzähl mir einen Witz.", "Gib mir ein Zitat.",
    "Was ist der Sinn des Lebens?", "Erzähl mir von der Liebe.", "Was denkst du über Computer?",
    "Gib mir einen Rat.", "Sag etwas Lustiges.", "Erzähl mir vom Wetter.",
    "Was ist ein Freund?", "Erzähl mir eine Geschichte.", "Was soll ich heute tun?", "Erzähl mir von der Arbeit.",
    "Sag etwas über Geld.", "Was ist Glück?", "Erzähl mir vom Essen.",
    "Was weißt du über Katzen?", "Sag mir etwas Wahres.", "Beschreib das Meer.",
)
PROMPTS_FOR_TARGET = {"en": ("de", GERMAN_PROMPTS), "de": ("en", ENGLISH_PROMPTS), "es": ("en", ENGLISH_PROMPTS),
                      "it": ("en", ENGLISH_PROMPTS)}  # target language -> (prompt language, prompts)


@dataclass
class LanguageSteeringResult:
    target: str
    unsteered: list[str] = field(default_factory=list)  # identified language of each answer
    steered: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def share(self, which: str, language: str) -> float:
        answers = getattr(self, which)
        return sum(a == language for a in answers) / max(1, len(answers))


def clamp_value(build_report: dict, layer: int, language: str, multiplier: float) -> float:
    """`multiplier` times the language feature's mean activation when it fires (from the build
    report's labelling numbers), rounded to 0.1: the scale the steering tables are quoted in."""
    stats = build_report["labels"]["language_features"][str(layer)][language]
    return round(multiplier * stats["mean_activation"], 1)


def measure(base_url: str, model: str, layer: int, index: int, value: float, target: str, *,
            prompts: tuple[str, ...] = ENGLISH_PROMPTS, api_key: str | None = None,
            max_tokens: int = 32) -> LanguageSteeringResult:
    """Greedy chat answers to `prompts`, unsteered and with feature (layer, index) clamped."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = LanguageSteeringResult(target)
    steering = {"features": [{"layer": layer, "index": index, "mode": "clamp", "value": value}]}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
        for prompt in prompts:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": 0}
            plain = _answer(http, body)
            steered = _answer(http, body | {"steering": steering})
            result.unsteered.append(identify(plain))
            result.steered.append(identify(steered))
            result.examples.append({"prompt": prompt, "unsteered": plain, "steered": steered})
    return result


def _answer(http: httpx.Client, body: dict) -> str:
    response = http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]
