"""Explanations without an engine (issue 24 item 2): the detection score's arithmetic, P(yes)
from top_logprobs and its text fallback, the explainer prompt cut to its budget, and the
explanations table in old and new dashboard files, and the command's options."""

from __future__ import annotations

import math

import pytest

from steerserve.analysis import explanation_store
from steerserve.analysis.dashboard_store import DashboardStore
from steerserve.analysis.explanation_store import Explanation
from steerserve.analysis.dashboards import _parser
from steerserve.analysis.explanations import detection_score, explain_prompt, marked, wanted, yes_probability


def test_detection_score_is_the_probability_a_held_out_example_outscores_a_random_one():
    # pairs: (.9,.5)=1 (.9,.1)=1 (.5,.5)=tie 1/2 (.5,.1)=1 (.2,.5)=0 (.2,.1)=1 -> 4.5 of 6
    assert detection_score([0.9, 0.5, 0.2], [0.5, 0.1]) == 0.75
    assert detection_score([1.0, 1.0], [0.0]) == 1.0
    assert detection_score([0.0], [1.0, 1.0]) == 0.0
    assert detection_score([0.5, 0.5], [0.5, 0.5, 0.5]) == 0.5  # all ties: chance
    assert detection_score([], [0.3]) is None and detection_score([0.3], []) is None


def _choice(top: dict[str, float] | None, text: str = "") -> dict:
    logprobs = None if top is None else {"content": [{"token": text, "logprob": 0.0, "top_logprobs": [
        {"token": t, "logprob": math.log(p)} for t, p in top.items()]}]}
    return {"message": {"role": "assistant", "content": text}, "logprobs": logprobs}


def test_yes_probability_from_top_logprobs_then_the_answer_text():
    # " yes" and "Yes" both count as yes; other tokens are ignored, so 0.3 / (0.3 + 0.1 + 0.2)
    assert yes_probability(_choice({" yes": 0.2, "Yes": 0.1, "No": 0.1, " no": 0.2, "The": 0.4}, "The")) \
        == pytest.approx(0.5)
    assert yes_probability(_choice({"yes": 0.06, "no": 0.02, "x": 0.9})) == pytest.approx(0.75)
    assert yes_probability(_choice({"maybe": 0.9}, "Yes, it does")) == 1.0  # neither in the top: the text
    assert yes_probability(_choice(None, " no.")) == 0.0
    assert yes_probability(_choice(None, "perhaps")) == 0.5
    assert yes_probability({"message": {"content": None}}) == 0.5


def test_explain_prompt_marks_the_peak_and_fits_its_budget():
    example = {"tokens": ["Ein", " gut", "er", "\n", "Tag"], "activations": [0.0, 1.5, 3.25, 0.0, 0.5]}
    assert marked(example) == "Ein gut«er» Tag (3.25)"
    examples = [example] * 10
    full = explain_prompt(examples, 10_000)
    assert full.count("«er»") == 10 and full.endswith("what does the feature detect?")
    short = explain_prompt(examples, 250)
    assert len(short) <= 250 and 1 <= short.count("«er»") < 10
    assert explain_prompt(examples, 10).count("«er»") == 1  # never fewer than one example


def test_explanations_table_old_and_new_files(tmp_path):
    path = tmp_path / "d.db"
    DashboardStore(path).close()  # a file from before explanations: no table
    old = DashboardStore(path, readonly=True)
    assert explanation_store.explained(old.db) == set()
    assert explanation_store.served(old.db, 3, 1) is None and explanation_store.search(old.db, "x", None) == []
    store = DashboardStore(path)
    explanation_store.put(store.db, [
        Explanation(3, 1, "Umlaute in German words", "m", 0.8, 5, 4, None),
        Explanation(3, 2, None, "m", None, 0, 0, "http://x/v1/chat/completions answered 400: too long"),
        Explanation(2, 7, "the word ÜBER", "m", None, 0, 0, None),
    ])
    served = DashboardStore(path, readonly=True).db
    assert explanation_store.explained(served) == {(3, 1), (2, 7)}  # the failure is asked again on rerun
    assert explanation_store.served(served, 3, 1) == {"text": "Umlaute in German words", "model": "m",
                                                      "detection_score": 0.8, "held_out": 5, "random": 4}
    assert explanation_store.served(served, 3, 2) is None
    assert explanation_store.search(served, " GERMAN ", None) == [(3, 1, "Umlaute in German words")]
    assert explanation_store.search(served, "über", None) == [(2, 7, "the word ÜBER")]
    assert explanation_store.search(served, "über", 3) == []


def test_explain_options(capsys):
    base = ["--layers", "3", "--output", "d.db"]
    assert not wanted(_parser().parse_known_args(base)[0])
    args = _parser().parse_known_args([*base, "--explain-model", "m", "--explain-random", "0"])[0]
    assert wanted(args) and (args.explain_with, args.explain_limit, args.explain_examples, args.explain_held_out,
                             args.explain_random, args.explain_workers) == (None, None, 5, 5, 0, 4)
    for flag, value, low in (("--explain-limit", "0", 1), ("--explain-workers", "x", 1), ("--explain-held-out", "-1", 0)):
        with pytest.raises(SystemExit):
            _parser().parse_known_args([*base, flag, value])
        assert f"argument {flag}: must be an integer >= {low}, not '{value}'" in capsys.readouterr().err
