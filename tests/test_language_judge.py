"""The language judge of the language-steering measurement (models/recipe/language_steering.py).

A judge limited to four languages called German function-word salad English, so a clamp that
produced it counted as steering into English (issue 21). These run the real identifier on
salads of German words that English shares, and on real sentences of the corpus languages.
"""

from __future__ import annotations

import pytest

from models.recipe.language_steering import identify

GERMAN_SALADS = [  # words of German that English shares, in the order a degenerate clamp repeats them
    "so was in an also man will die",
    "Ich bin so, was an in also man",
    "will man so in an was",
    "der die und das ist nicht ein zu den von mit sich des auf für im dem",
]
SENTENCES = {
    "The weather today is sunny, and we will go to the beach in the afternoon.": "en",
    "A friend in need is a friend indeed.": "en",
    "Never put off till tomorrow what you can do today.": "en",
    "Das Wetter ist heute schön, und wir gehen am Nachmittag an den Strand.": "de",
    "Wer anderen eine Grube gräbt, fällt selbst hinein.": "de",
    "Ich habe keine Zeit, weil ich morgen früh zur Arbeit fahren muss.": "de",
    "El tiempo es bueno hoy y vamos a la playa por la tarde.": "es",
    "Il tempo è bello oggi e andiamo al mare nel pomeriggio.": "it",
}


@pytest.mark.parametrize("salad", GERMAN_SALADS)
def test_german_function_word_salad_is_not_english(salad):
    assert identify(salad) == "salad"


def test_a_short_run_of_shared_words_is_not_english_either():
    assert identify("so in an war was") == "und"  # too short to call salad; "war" is German only


@pytest.mark.parametrize("sentence", SENTENCES)
def test_real_sentences_are_judged_by_their_language(sentence):
    assert identify(sentence) == SENTENCES[sentence]


def test_no_words_is_no_language():
    assert identify("") == identify("123 !?") == "und"
