"""Measure language steering on a running server: clamp a language feature and count how many
answers to prompts in another language come out in the feature's language.

The judge (`identify`) is independent of our corpus, tokenizer and model: `lingua` (a pretrained
identifier from PyPI) over all of its 75 languages, checked against the text's function words.
A judge limited to the four corpus languages called German function-word salad ("so was in an
also man will die") English, and lingua alone does too: the words German shares with English
outweigh the few only German has. So a text that is little but function words is `salad`, not a
language, and one whose words only one corpus language uses contradict the identifier is `und`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import httpx

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


# The commonest articles, pronouns, prepositions, conjunctions and auxiliaries of each corpus language.
FUNCTION_WORDS = {
    "en": frozenset("""the a an and or but of to in on at by for with from as is are was were be been it its this
        that these those he she they we you i me him her them us my your his our their not no so if then than there
        what which who will would can could do does did have has had also all one""".split()),
    "de": frozenset("""der die das den dem des ein eine einen einem einer eines und oder aber nicht kein keine ist
        sind war waren bin bist hat haben hatte wird werden will ich du er sie es wir ihr man mich mir dich dir sich
        uns in im an am auf aus bei mit nach von vom zu zum zur für um über unter so was wie wer wo wenn dass als
        auch noch nur schon doch""".split()),
    "es": frozenset("""el la los las un una unos unas y o pero no de del a al en con por para sin sobre que qué es
        son era fue ser está están hay yo tú él ella nosotros ellos me te se nos le les lo mi tu su sus este esta
        ese esa como cuando donde si muy más ya también""".split()),
    "it": frozenset("""il lo la i gli le un uno una e ed o ma non di del della dei delle a al alla da dal in nel
        nella con su per tra fra che è sono era essere ha hanno io tu lui lei noi voi loro mi ti si ci vi mio tuo
        suo questo questa quello quella come quando dove se più già anche molto""".split()),
}
SALAD_WORDS = 6  # a text of at least this many words ...
SALAD_SHARE = 0.85  # ... of which at least this share are function words is no language's prose


def identify(text: str) -> str:
    """The ISO 639-1 code of the text's language; `salad` for a run of function words, `und`
    when there is no text or its function words contradict the identifier."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    if not words:
        return "und"
    functional = [w for w in words if any(w in listed for listed in FUNCTION_WORDS.values())]
    if len(words) >= SALAD_WORDS and len(functional) >= SALAD_SHARE * len(words):
        return "salad"
    found = _detector().detect_language_of(text)
    language = found.iso_code_639_1.name.lower() if found is not None else "und"
    only = {lang: sum(w in listed and not any(w in other for o, other in FUNCTION_WORDS.items() if o != lang)
                      for w in words) for lang, listed in FUNCTION_WORDS.items()}
    if language in only and max(only.values()) > only[language]:
        return "und"
    return language


@functools.cache
def _detector():
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


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
