"""The exact language judge (moved here from models/recipe/language_steering.py, which the
default model's build and the language table still use through it).

`identify` is independent of any corpus, tokenizer and model: `lingua` (a pretrained identifier
from PyPI, the `[test]` extra) over all of its 75 languages, checked against the text's function
words. A judge limited to the four corpus languages called German function-word salad ("so was
in an also man will die") English, and lingua alone does too: the words German shares with
English outweigh the few only German has. So a text that is little but function words is
`salad`, not a language, and one whose words only one corpus language uses contradict the
identifier is `und`.

On AxBench's 0-2 concept scale (`concept_score`): 2 when the answer is identified as the target
language; 1 when it is not, but at least FUNCTION_SHARE of its words are function words only the
target language uses (the salad a strong clamp makes: the concept is there, the language is not);
0 otherwise (for a language without a function-word list, 2 or 0).
"""

from __future__ import annotations

import functools
import re

LINGUA_EXTRA = "pip install lingua-language-detector"

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
FUNCTION_SHARE = 0.2  # concept score 1: this share of the words are the target language's own function words


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.lower())


def _only_in(language: str, word: str) -> bool:
    return word in FUNCTION_WORDS[language] and not any(
        word in listed for other, listed in FUNCTION_WORDS.items() if other != language)


def identify(text: str) -> str:
    """The ISO 639-1 code of the text's language; `salad` for a run of function words, `und`
    when there is no text or its function words contradict the identifier."""
    words = _words(text)
    if not words:
        return "und"
    functional = [w for w in words if any(w in listed for listed in FUNCTION_WORDS.values())]
    if len(words) >= SALAD_WORDS and len(functional) >= SALAD_SHARE * len(words):
        return "salad"
    found = _detector().detect_language_of(text)
    language = found.iso_code_639_1.name.lower() if found is not None else "und"
    only = {lang: sum(_only_in(lang, w) for w in words) for lang in FUNCTION_WORDS}
    if language in only and max(only.values()) > only[language]:
        return "und"
    return language


def language_code(name: str) -> str:
    """The ISO 639-1 code of a language lingua knows by `name` (e.g. German -> de); ValueError
    naming the install line, or the unknown name."""
    try:
        from lingua import Language
    except ImportError:
        raise ValueError(f"the language judge needs lingua: {LINGUA_EXTRA}") from None
    try:
        return Language.from_str(name).iso_code_639_1.name.lower()
    except ValueError:
        raise ValueError(f"judge.language {name!r} is not a language lingua knows (e.g. German, Spanish)") from None


def concept_score(text: str, code: str) -> int:
    """0-2: is the answer in the language with ISO code `code` (see the module's docstring)."""
    if identify(text) == code:
        return 2
    words = _words(text)
    if code in FUNCTION_WORDS and words and sum(_only_in(code, w) for w in words) >= FUNCTION_SHARE * len(words):
        return 1
    return 0


@functools.cache
def _detector():
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()
