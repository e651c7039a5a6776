"""`steerserve bench-steering` without a server: its arithmetic (harmonic mean, split, chosen
strength, bootstrap), the judges' parsing of recorded answers and their 0-2 mappings, bad input
files, the steering specs each method sends, and resuming a run's files."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from steerserve.analysis.steering_bench import language_judge, offline_judges, scoring
from steerserve.analysis.steering_bench.capability import BUILTIN_CAPABILITY, read_questions
from steerserve.analysis.steering_bench.inputs import (
    BUILTIN_INSTRUCTIONS, BenchInputError, Concept, FeatureRef, instructions_for, read_concepts,
    read_instructions,
)
from steerserve.analysis.steering_bench.llm_judge import PROMPTS, JudgeError, LLMJudge, parse_rating
from steerserve.analysis.steering_bench.methods import Edit, Steered, random_edits
from steerserve.analysis.steering_bench.store import RunStore
from steerserve.serve_process import free_port
from tests.conftest import ROOT


@pytest.mark.parametrize(("scores", "expected"), [
    ((2, 2, 2), 2.0),
    ((1, 2, 2), 1.5),  # 3 / (1 + 1/2 + 1/2)
    ((1, 1, 2), 1.2),  # 3 / (1 + 1 + 1/2)
    ((2, None, 1), 4 / 3),  # relevance not judged: over concept and fluency
    ((0, 2, 2), 0.0),
    ((2, None, 0), 0.0),
])
def test_harmonic_mean(scores, expected):
    assert scoring.harmonic(scores) == pytest.approx(expected, abs=1e-12)


def test_harmonic_mean_of_nothing_judged_is_an_error():
    with pytest.raises(ValueError, match="no score was judged"):
        scoring.harmonic((None, None, None))


def test_split_is_seeded_halves_of_the_sorted_ids():
    halves = scoring.split(["e", "a", "d", "c", "b"], 0)
    assert halves == {"a": "selection", "b": "selection", "c": "selection", "d": "report", "e": "report"}
    assert scoring.split(["a", "b", "c", "d", "e"], 0) == halves  # the file's order does not matter
    assert scoring.split(["a", "b", "c", "d", "e"], 1) != halves
    builtin = scoring.split([i.id for i in read_instructions(BUILTIN_INSTRUCTIONS)], 0)
    assert sorted(builtin.values()).count("selection") == 22 and len(builtin) == 44


def test_chosen_strength_is_the_best_selection_mean_and_the_smallest_on_ties():
    assert scoring.choose_strength({1.0: [1, 1], 2.0: [2, 1], 4.0: [1.5, 1.5], 8.0: [0, 0]}) == 2.0
    assert scoring.choose_strength({8.0: [2], 4.0: [2], 1.0: []}) == 4.0  # 1 has no scored answer
    with pytest.raises(ValueError, match="no strength has a scored answer"):
        scoring.choose_strength({1.0: [], 2.0: []})


def test_bootstrap_interval():
    assert scoring.bootstrap([1.5], 0) == scoring.Interval(1.5, 1.5, 1.5)
    assert scoring.bootstrap([2.0, 2.0, 2.0], 3) == scoring.Interval(2.0, 2.0, 2.0)
    # 20 resamples at 90%: the 2nd smallest and the 2nd largest of their means; the resamples
    # draw random.Random(seed).randrange(n) n times each
    rng = random.Random(0)
    means = sorted(sum([0, 1, 2, 2][rng.randrange(4)] for _ in range(4)) / 4 for _ in range(20))
    assert means[:2] == [0.5, 0.5] and means[-2:] == [1.75, 2.0]
    assert scoring.bootstrap([0, 1, 2, 2], 0, samples=20, confidence=0.9) == scoring.Interval(1.25, 0.5, 1.75)
    assert scoring.bootstrap([0.0, 0.5, 1.0, 1.5, 2.0], 7) == scoring.Interval(1.0, 0.4, 1.5)
    assert scoring.bootstrap([0.0, 0.5, 1.0, 1.5, 2.0], 7) == scoring.bootstrap([0.0, 0.5, 1.0, 1.5, 2.0], 7)


# Judge answers as LLMs write them (and one as the tiny test model does).
RECORDED = [
    ("The text is written entirely in German, so the concept is clearly present.\nRating: [[2]]", 2),
    ("Reason: a few Spanish words, mostly English.\n\nRating: 1", 1),
    ("**Reason:** unrelated to the instruction.\n**Rating:** [[0]]", 0),
    ("At first glance [[0]], but the last sentence answers it.\nRating: [[1]]", 1),
    ("rating=2", 2),
    ("I would give it a 2 out of 2.", None),  # no rating in the asked form
    ("Rating: [[3]]", None),  # off the scale
    ("Rating: 1.5", None),
    ("Rating: 10", None),
    ("ist ist ein krä ist, ist ein er ist", None),
    ("", None),
]


@pytest.mark.parametrize(("answer", "rating"), RECORDED)
def test_judge_answers_are_parsed_or_unparseable(answer, rating):
    assert parse_rating(answer) == rating


def test_judge_prompts_ask_for_the_rating_on_the_three_scales():
    for scale, prompt in PROMPTS.items():
        text = prompt.format(description="writes in German", instruction="Tell me a joke.", answer="Ein Witz.")
        assert text.rstrip().endswith("`Rating: [[N]]` with N your rating: 0, 1 or 2.")
        assert all(f"{n} = " in text for n in (0, 1, 2)), scale
        assert "Ein Witz." in text
    assert "writes in German" in PROMPTS["concept"].format(description="writes in German", instruction="", answer="")
    assert "Tell me a joke." in PROMPTS["relevance"].format(description="", instruction="Tell me a joke.", answer="")


def test_an_unreachable_judge_is_an_error_naming_it():
    url = f"http://127.0.0.1:{free_port()}"
    judge = LLMJudge(url, "judge", None, timeout=5)
    with pytest.raises(JudgeError, match=f"the judge at {url} cannot be reached"):
        judge.judge("Tell me a joke.", "writes in German", "Ein Witz.")
    judge.close()


@pytest.mark.parametrize(("text", "score"), [
    ("Das Wetter ist heute schön, und wir gehen am Nachmittag an den Strand.", 2),
    ("so was in an also man will die", 1),  # salad: not German, but 2 of its 8 words only German uses
    ("der die und das ist nicht ein zu den von mit sich des auf für im dem", 1),
    ("so what is in it for me and you", 0),  # salad of English's own
    ("The weather today is sunny, and we will go to the beach in the afternoon.", 0),
    ("", 0),
])
def test_language_concept_score(text, score):
    assert language_judge.concept_score(text, "de") == score


def test_offline_mappings_and_their_thresholds():
    assert [offline_judges.firing_score(s) for s in (0.0, 0.099, 0.1, 0.299, 0.3, 1.0)] == [0, 0, 1, 1, 2, 2]
    assert [offline_judges.fluency_score(n, 2.0) for n in (1.0, 2.5, 2.51, 3.5, 3.51, None)] == [2, 2, 1, 1, 0, 0]


def write(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GERMAN = {"name": "german", "description": "writes in German", "features": [{"layer": 3, "index": 424}]}


@pytest.mark.parametrize(("rows", "message"), [
    ([GERMAN, "{not json"], ":2: not JSON"),
    ([{"name": "german", "description": "writes in German"}],
     ":1: concept 'german' give exactly one of features, preset, vector, contrast (got none)"),
    ([GERMAN | {"preset": "german"}],
     ":1: concept 'german' give exactly one of features, preset, vector, contrast (got features, preset)"),
    ([GERMAN | {"features": []}], ":1: concept 'german' features must be a non-empty list"),
    ([GERMAN | {"features": [{"layer": 3}]}], ":1: concept 'german' features[0].index must be a non-negative integer"),
    ([GERMAN | {"features": [{"layer": 3, "index": 1, "mean_activation": -1}]}],
     ":1: concept 'german' features[0].mean_activation must be a positive number"),
    ([GERMAN, GERMAN], ":2: concept 'german' the name is taken by the concept at "),
    ([GERMAN | {"judge": {"language": "Klingon"}}],
     ":1: concept 'german' judge.language 'Klingon' is not a language lingua knows"),
    ([GERMAN | {"judge": {"model": "gpt"}}], ":1: concept 'german' judge must be {\"language\": NAME}"),
    ([{"name": "v", "description": "d", "vector": "calm"}], ":1: concept 'v' layer (the vector's layer) must be"),
    ([GERMAN | {"colour": 1}], ":1: concept 'german' unknown field(s) colour"),
    ([GERMAN | {"name": "a b"}], ":1: concept 'a b' name must be 1 to 64 characters"),
    ([{"name": "c", "description": "d", "contrast": {"positive": ["x"], "negative": [], "layers": [1]}}],
     ":1: concept 'c' contrast.negative must be a non-empty list of texts"),
])
def test_bad_concept_lines_name_the_file_line_and_concept(tmp_path, rows, message):
    path = write(tmp_path / "concepts.jsonl", rows)
    with pytest.raises(BenchInputError) as raised:
        read_concepts(tmp_path / "concepts.jsonl")
    assert str(raised.value).startswith(path) and message in str(raised.value)


def test_concept_lines_are_read(tmp_path):
    write(tmp_path / "c.jsonl", [GERMAN | {"judge": {"language": "German"}, "prompt": "Answer in German."},
                                 {"name": "calm", "description": "is calm", "vector": "calm", "layer": 2}])
    german, calm = read_concepts(tmp_path / "c.jsonl")
    assert german == Concept("german", "writes in German", f"{tmp_path / 'c.jsonl'}:1", (FeatureRef(3, 424, None),),
                             language="German", prompt="Answer in German.")
    assert (german.source, calm.source, calm.layer) == ("features", "vector", 2)
    assert german.ask() == "Answer in German."
    assert calm.ask() == "In your answer, make sure that it is calm."


@pytest.mark.parametrize(("rows", "message"), [
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], ":2: instruction id 'a' appears twice"),
    ([{"id": "a", "prompt": ""}, {"id": "b", "prompt": "y"}], ":1: prompt must be a non-empty string"),
    ([{"id": "a", "text": "x"}], ":1: an instruction is"),
    ([{"id": "a", "prompt": "x"}], ": at least 2 instructions are needed"),
])
def test_bad_instruction_lines(tmp_path, rows, message):
    write(tmp_path / "i.jsonl", rows)
    with pytest.raises(BenchInputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_instructions(tmp_path / "i.jsonl")


def test_builtin_instructions_cover_the_default_models_languages():
    instructions = read_instructions(BUILTIN_INSTRUCTIONS)
    by_language = {lang: sum(i.language == lang for i in instructions) for lang in ("English", "German", "Spanish", "Italian")}
    assert by_language == {"English": 11, "German": 11, "Spanish": 11, "Italian": 11}
    for i in instructions:  # each is in the language it says (the judge skips a concept's own language by it)
        assert language_judge.identify(i.prompt) == language_judge.language_code(i.language), i
    german = Concept("german", "writes in German", "x:1", (FeatureRef(3, 424, None),), language="German")
    assert [i.language for i in instructions_for(german, instructions)].count("German") == 0
    assert len(instructions_for(german, instructions)) == 33


def test_the_specs_each_method_sends():
    concept = Concept("german", "writes in German", "x:1", (FeatureRef(3, 424, 15.631),))
    steered = Steered(concept, (Edit(3, 424, scale=15.631),), ("clamp", "add"), ((3, 424),))
    randoms = random_edits(steered, {3: 1024}, 256, 0)
    assert steered.methods == ("none", "prompt", "clamp", "add", "ablate", "random-clamp", "random-add")
    assert steered.spec("none", None, randoms) is None and steered.spec("prompt", None, randoms) is None
    assert steered.spec("clamp", 2.0, randoms) == {"features": [{"index": 424, "layer": 3, "mode": "clamp",
                                                                 "value": 31.262}]}
    assert steered.spec("prompt+add", 4.0, randoms) == {"features": [{"index": 424, "layer": 3, "mode": "add",
                                                                      "value": 62.524}]}
    assert steered.spec("ablate", None, randoms) == {"features": [{"index": 424, "layer": 3, "mode": "ablate"}]}
    (random,) = randoms
    assert random.layer == 3 and random.index != 424 and 0 <= random.index < 1024
    assert random_edits(steered, {3: 1024}, 256, 0) == randoms  # seeded: a rerun steers the same
    assert steered.spec("random-clamp", 2.0, randoms)["features"][0] == {"index": random.index, "layer": 3,
                                                                         "mode": "clamp", "value": 31.262}
    vector = Steered(Concept("calm", "is calm", "x:2", vector="calm", layer=2),
                     (Edit(2, vector="calm", norm=3.0),), ("add",), ())
    (direction,) = random_edits(vector, {}, 256, 0)
    from steerserve_sae.protocol.spec import decode_vector

    assert float((decode_vector(direction.vector) ** 2).sum() ** 0.5) == pytest.approx(3.0, rel=1e-5)
    assert vector.spec("add", 0.5, (direction,)) == {"vectors": [{"vector": "calm", "layer": 2, "mode": "add",
                                                                  "value": 0.5}]}


ROW = {"concept": "german", "method": "clamp", "strength": 2.0, "instruction": "en-01", "split": "report",
       "text": "Ein Witz.", "concept_score": 2, "relevance": None, "fluency": 2, "harmonic": 2.0, "unparsed": []}


def test_a_run_resumes_from_its_rows_and_refuses_other_settings(tmp_path):
    store = RunStore(tmp_path)
    settings = {"model": "m", "seed": 0, "concepts": {"german": "abc"}, "instructions": {"en-01": "1"}}
    store.open(settings)
    store.add(ROW)
    with pytest.raises(RuntimeError, match="scored twice"):
        store.add(ROW)
    other = ROW | {"instruction": "en-02"}
    with (tmp_path / "scores.jsonl").open("a") as f:  # a crash cut the last line off
        f.write(json.dumps(other)[:40])
    again = RunStore(tmp_path)
    merged = again.open(settings | {"concepts": {"spanish": "def"}})
    assert list(again.rows.values()) == [ROW]
    assert merged["concepts"] == {"german": "abc", "spanish": "def"}
    assert (tmp_path / "scores.jsonl").read_text() == json.dumps(ROW) + "\n"
    again.add(other)
    assert [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()] == [ROW, other]
    with pytest.raises(BenchInputError, match="holds a run with seed = 0, not 1"):
        RunStore(tmp_path).open(settings | {"seed": 1})
    with pytest.raises(BenchInputError, match="whose concepts german were defined differently"):
        RunStore(tmp_path).open(settings | {"concepts": {"german": "changed"}})
    (tmp_path / "scores.jsonl").write_text("{bad\n" + json.dumps(ROW) + "\n")
    with pytest.raises(BenchInputError, match="scores.jsonl:1: not JSON"):
        RunStore(tmp_path).open(settings)


@pytest.mark.parametrize(("args", "message"), [
    (["--strengths", "1,x"], "bench-steering: --strengths '1,x': give numbers, e.g. 1,2,4,8"),
    (["--strengths", "0,2"], "bench-steering: --strengths '0,2': give positive numbers, e.g. 1,2,4,8"),
    (["--concurrency", "0"], "bench-steering: --concurrency and --max-tokens must be at least 1"),
])
def test_bad_options_exit_1_before_any_server(tmp_path, args, message):
    concepts = write(tmp_path / "c.jsonl", [GERMAN])
    run = subprocess.run([sys.executable, "-m", "steerserve", "bench-steering", "--concepts", concepts, "--out",
                          str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9", *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1 and run.stderr.strip() == message and "Traceback" not in run.stderr


def test_a_bad_concept_file_exits_1_naming_the_line(tmp_path):
    concepts = write(tmp_path / "c.jsonl", [GERMAN, {"name": "x", "description": "y", "vector": "calm", "layer": 1}])
    run = subprocess.run([sys.executable, "-m", "steerserve", "bench-steering", "--concepts", concepts, "--out",
                          str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (f"bench-steering: {concepts}:2: concept 'x': a stored vector has no feature to "
                                  "judge it by offline: give judge.language, or --judge-url")


@pytest.mark.parametrize(("row", "message"), [
    ({"id": 1, "question": "q", "choices": ["a"], "answer": 0}, ":1: choices must be a list of at least 2"),
    ({"id": 1, "question": "q", "choices": ["a", "b"], "answer": 2}, ":1: answer must be the index of the right choice (0 to 1)"),
    ({"id": 1, "question": "", "choices": ["a", "b"], "answer": 0}, ":1: question must be a non-empty string"),
    ({"id": 1, "question": "q", "choices": ["a", "b"]}, ":1: a question is"),
])
def test_bad_capability_lines(tmp_path, row, message):
    path = write(tmp_path / "q.jsonl", [row])
    with pytest.raises(BenchInputError) as raised:
        read_questions(tmp_path / "q.jsonl")
    assert str(raised.value).startswith(path + message)


def test_builtin_capability_questions():
    questions = read_questions(BUILTIN_CAPABILITY)
    assert len(questions) == 20 and [q.id for q in questions][:6] == ["en-1", "en-2", "en-3", "en-4", "en-5", "de-1"]
    right = [q.choices[q.answer] for q in questions]
    assert right[:3] == ["indeed", "worm", "words"] and right[5] == "hinein" and right[-1] == "mai"
    assert [q.answer for q in questions][:3] == [0, 1, 2]  # the right ending's place rotates
