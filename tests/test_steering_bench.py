"""`steerserve bench-steering` end to end against the shared tiny-model server: the offline
judges, the LLM judge (the same server is a real OpenAI-compatible endpoint; its answers are
nothing like a rating, so they are the unparseable case), resume, and errors that name the
concept and its line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import httpx
import pytest

from steerserve.analysis.steering_bench import scoring
from steerserve.serve_process import free_port
from tests.conftest import API_KEY, AUTH, MODEL_NAME, ROOT

INSTRUCTIONS = [{"id": "a", "prompt": "Tell me about the weather today."}, {"id": "b", "prompt": "How do I bake bread?"},
                {"id": "c", "prompt": "When does the train leave?"}, {"id": "d", "prompt": "Describe a rainy day."}]
WEATHER = {"name": "weather", "description": "talks about the weather",
           "features": [{"layer": 1, "index": 3, "mean_activation": 4.0}]}
CONTRAST = {"name": "rain", "description": "talks about rain",
            "contrast": {"positive": ["It rains all day.", "Rain and more rain today."],
                         "negative": ["The bread is baking.", "The train leaves at eight."], "layers": [2]}}
PRESET = {"name": "preset-weather", "description": "talks about the weather", "preset": "bench-weather"}
STRENGTHS = "1,4"
ROWS_PER_STEERED = {  # methods x strengths x 4 instructions, plus prompt+M on the 2 report ones
    "weather": (3 + 4 * 2) * 4 + 2 * 2,  # none prompt ablate, clamp add random-clamp random-add
    "rain": (3 + 2 * 2) * 4 + 1 * 2,  # none prompt ablate, add random-add
    "preset-weather": (2 + 2 * 2) * 4 + 1 * 2,  # none prompt, preset random-preset
}


def bench(server, work, *args: str, concepts: list[dict] | None = None) -> subprocess.CompletedProcess:
    (work / "concepts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in concepts or [WEATHER, CONTRAST, PRESET]))
    (work / "instructions.jsonl").write_text("".join(json.dumps(i) + "\n" for i in INSTRUCTIONS))
    return subprocess.run(
        [sys.executable, "-m", "steerserve", "bench-steering", "--base-url", server.base_url, "--api-key", API_KEY,
         "--concepts", str(work / "concepts.jsonl"), "--instructions", str(work / "instructions.jsonl"),
         "--strengths", STRENGTHS, "--max-tokens", "8", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT)


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def preset(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as http:
        http.delete("/v1/steering/presets/bench-weather")
        http.post("/v1/steering/presets", json={"name": "bench-weather", "steering": {"features": [
            {"layer": 1, "index": 3, "mode": "add", "value": 2.0}]}}).raise_for_status()
    return "bench-weather"


@pytest.fixture(scope="module")
def offline(server, preset, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    run = bench(server, work, "--out", str(work / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    return work, run


def test_every_answer_is_scored_once_with_its_split(offline):
    work, run = offline
    rows = rows_of(work / "out")
    keys = [(r["concept"], r["method"], r["strength"], r["instruction"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {c: sum(r["concept"] == c for r in rows) for c in ROWS_PER_STEERED} == ROWS_PER_STEERED
    halves = scoring.split([i["id"] for i in INSTRUCTIONS], 0)
    for r in rows:
        assert r["split"] == halves[r["instruction"]]
        assert r["judge"] == "offline" and r["relevance"] is None and r["unparsed"] == []
        assert r["harmonic"] == pytest.approx(scoring.harmonic((r["concept_score"], None, r["fluency"])), abs=1e-4)
        if r["method"].startswith("prompt+"):
            assert r["split"] == scoring.REPORT
    # the unsteered answer is one generation, whichever concept it was scored for
    none = defaultdict(set)
    for r in rows:
        if r["method"] == "none":
            none[r["instruction"]].add(r["text"])
    assert all(len(texts) == 1 for texts in none.values())
    assert (work / "out" / "report.md").read_text().startswith("# Steering benchmark")
    for name in ("summary.json", "strength_weather.png", "strength_rain.png", "concept_vs_fluency.png"):
        assert (work / "out" / name).stat().st_size > 0


def test_strengths_are_chosen_on_the_selection_half_and_reported_on_the_other(offline):
    work, _ = offline
    rows, summary = rows_of(work / "out"), json.loads((work / "out" / "summary.json").read_text())
    assert summary["instructions"] == {"selection": 2, "report": 2} and summary["relevance_judged"] is False
    for concept, entry in summary["concepts"].items():
        for method, m in entry["methods"].items():
            base = method.removeprefix("prompt+").removeprefix("random-")
            if method in ("none", "prompt", "ablate"):
                assert m["strength"] is None
                continue
            by_strength = {s: [r["harmonic"] for r in rows if (r["concept"], r["method"], r["strength"], r["split"])
                               == (concept, base, s, "selection")] for s in (1.0, 4.0)}
            assert m["strength"] == scoring.choose_strength(by_strength), (concept, method)
            report = sorted((r for r in rows if (r["concept"], r["method"], r["strength"], r["split"])
                             == (concept, method, m["strength"], "report")), key=lambda r: r["instruction"])
            assert m["answers"] == len(report) == 2
            interval = scoring.bootstrap([r["harmonic"] for r in report], 0)
            assert m["harmonic"] == {"mean": round(interval.mean, 4), "low": round(interval.low, 4),
                                     "high": round(interval.high, 4)}
            assert m["relevance"] is None


def test_the_random_control_and_the_feature_judge(offline, http):
    work, _ = offline
    rows = rows_of(work / "out")
    clamped = {r["instruction"]: r["text"] for r in rows if (r["concept"], r["method"], r["strength"]) == ("weather", "clamp", 4.0)}
    random = {r["instruction"]: r["text"] for r in rows if (r["concept"], r["method"], r["strength"]) == ("weather", "random-clamp", 4.0)}
    assert clamped != random
    # the feature judge's share, re-measured here: feature 1:3 at every token but the first of "\n" + answer
    row = next(r for r in rows if r["concept"] == "weather" and r["method"] == "clamp" and r["text"].strip())
    found = http.post("/v1/features/inspect", json={"prompt": "\n" + row["text"], "layers": [1], "top_k": 1,
                                                    "watch": [3]}).json()
    tokens = [t for t in found["tokens"][1:] if not t["special"]]
    share = sum(t["watched"]["1"][0]["activation"] > 0 for t in tokens) / len(tokens)
    assert row["firing_share"] == round(share, 4)
    assert row["concept_score"] == (2 if share >= 0.3 else 1 if share >= 0.1 else 0)


def test_a_rerun_scores_nothing_twice_and_a_cut_run_resumes(offline, server):
    work, _ = offline
    before = (work / "out" / "scores.jsonl").read_text()
    again = bench(server, work, "--out", str(work / "out"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "bench-steering: 0 answers generated" in again.stdout
    assert (work / "out" / "scores.jsonl").read_text() == before
    lines = before.splitlines()
    (work / "out" / "scores.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:30])  # cut mid-line
    resumed = bench(server, work, "--out", str(work / "out"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = rows_of(work / "out")
    assert sorted(map(json.dumps, after)) == sorted(map(json.dumps, map(json.loads, lines)))  # greedy: the same rows
    assert int(re.search(r"bench-steering: (\d+) answers generated", resumed.stdout).group(1)) <= 3


def test_the_llm_judge_path_counts_unparseable_answers(server, preset, tmp_path):
    run = bench(server, tmp_path, "--out", str(tmp_path / "out"), "--methods", "none,prompt,clamp",
                "--judge-url", server.base_url, "--judge-model", MODEL_NAME, "--judge-api-key", API_KEY,
                concepts=[WEATHER])
    assert run.returncode == 0, run.stderr[-3000:]
    rows = rows_of(tmp_path / "out")
    assert len(rows) == (2 + 2) * 4
    for r in rows:  # the tiny model rates nothing: every score unparsed, never guessed
        assert r["judge"] == f"llm:{MODEL_NAME}" and r["unparsed"] == ["concept", "relevance", "fluency"]
        assert (r["concept_score"], r["relevance"], r["fluency"], r["harmonic"]) == (None, None, None, None)
        assert set(r["judge_answers"]) == {"concept", "relevance", "fluency"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    methods = summary["concepts"]["weather"]["methods"]
    assert {m: (v["answers"], v["unparsed"], v["harmonic"]) for m, v in methods.items()} == {
        "none": (2, 2, None), "prompt": (2, 2, None)}  # clamp had no scored answer to choose a strength by
    assert summary["concepts"]["weather"]["not_chosen"] == ["clamp"]
    assert summary["relevance_judged"] is True


def test_an_unreachable_judge_stops_the_run_naming_the_concept(server, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = bench(server, tmp_path, "--out", str(tmp_path / "out"), "--methods", "none",
                "--judge-url", url, "--judge-model", "judge", concepts=[WEATHER])
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"the judge at {url} cannot be reached" in run.stderr
    assert f"(judging concept 'weather', {tmp_path / 'concepts.jsonl'}:1)" in run.stderr
    assert (tmp_path / "out" / "scores.jsonl").exists() is False


@pytest.mark.parametrize(("concept", "message"), [
    ({"name": "p", "description": "d", "preset": "no-such-preset"},
     "concept 'p': preset 'no-such-preset': the server answered 404: no steering preset named 'no-such-preset'"),
    ({"name": "f", "description": "d", "features": [{"layer": 1, "index": 3}]},
     "concept 'f': feature 1:3 has no mean activation to scale strengths by"),
    ({"name": "f", "description": "d", "features": [{"layer": 3, "index": 0, "mean_activation": 1.0}]},
     "concept 'f': feature 3:0: the server answered 404"),
    ({"name": "v", "description": "d", "vector": "no-such-vector", "layer": 1, "judge": {"language": "German"}},
     "concept 'v': vector 'no-such-vector': the server answered 404"),
])
def test_concepts_the_server_cannot_steer_are_errors_naming_the_line(server, tmp_path, concept, message):
    run = bench(server, tmp_path, "--out", str(tmp_path / "out"), concepts=[WEATHER, concept])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.startswith(f"bench-steering: {tmp_path / 'concepts.jsonl'}:2: {message}"), run.stderr


def test_a_method_no_concept_has_is_refused(server, tmp_path):
    run = bench(server, tmp_path, "--out", str(tmp_path / "out"), "--methods", "none,steer", concepts=[WEATHER])
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == ("bench-steering: --methods: steer is no method of these concepts (they have ablate, "
                                  "add, clamp, none, prompt, prompt+add, prompt+clamp, random-add, random-clamp)")


def test_save_presets_stores_each_concepts_best_method_and_refuses_a_foreign_preset(offline, server, http):
    work, _ = offline
    http.delete("/v1/steering/presets/rain")
    http.post("/v1/steering/presets", json={"name": "rain", "steering": {"features": [
        {"layer": 2, "index": 9, "mode": "add", "value": 1.0}]}}).raise_for_status()
    refused = bench(server, work, "--out", str(work / "out"), "--save-presets")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().endswith(f"{work / 'concepts.jsonl'}:2: concept 'rain': a preset named 'rain' exists "
                                           "and bench-steering did not make it: delete it or rename the concept")
    http.delete("/v1/steering/presets/rain")
    for _ in range(2):  # the second run replaces what the first stored
        saved = bench(server, work, "--out", str(work / "out"), "--save-presets")
        assert saved.returncode == 0, saved.stderr[-3000:]
        assert "bench-steering: 0 answers generated" in saved.stdout
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["presets"] == {"weather": summary["presets"]["weather"], "rain": "add", "preset-weather": "preset"}
    methods = summary["concepts"]["weather"]["methods"]
    selection = {m: methods[m]["by_strength"][f"{methods[m]['strength']:g}"]["selection"] for m in ("clamp", "add")}
    best = "clamp" if selection["clamp"] >= selection["add"] else "add"
    assert summary["presets"]["weather"] == best
    preset = http.get("/v1/steering/presets/weather").json()
    assert preset["steering"]["features"] == [{"layer": 1, "index": 3, "mode": best,
                                               "value": round(4.0 * methods[best]["strength"], 4)}]
    assert preset["description"].startswith(f"bench-steering: talks about the weather; {best} at "
                                            f"{methods[best]['strength']:g}x; report half (2 answers, judge offline)")
    assert "preset `weather` stored" in (work / "out" / "report.md").read_text()


def test_a_stored_vector_concept(server, http, tmp_path):
    import base64

    import numpy as np

    d_model = http.get("/v1/saes").json()["d_model"]
    vector = base64.b64encode(np.full(d_model, 3.0, dtype="<f4").tobytes()).decode()
    http.delete("/v1/steering/vectors/bench-push")
    http.post("/v1/steering/vectors", json={"name": "bench-push", "vector": vector, "layer": 1}).raise_for_status()
    concept = {"name": "push", "description": "is pushed", "vector": "bench-push", "layer": 1,
               "judge": {"language": "German"}}
    run = bench(server, tmp_path, "--out", str(tmp_path / "out"), "--methods", "none,add", concepts=[concept])
    assert run.returncode == 0, run.stderr[-3000:]
    rows = rows_of(tmp_path / "out")
    assert sorted((r["method"], r["strength"]) for r in rows) == sorted(
        [("none", None)] * 4 + [("add", 1.0)] * 4 + [("add", 4.0)] * 4)
    none = {r["instruction"]: r["text"] for r in rows if r["method"] == "none"}
    assert any(r["text"] != none[r["instruction"]] for r in rows if r["strength"] == 4.0)


def independent_loglik(http, question: str, choice: str, steering: dict | None) -> float:
    """Mean log-probability of the choice's tokens, from a text prompt this time: the question's
    token count from /tokenize, the rest of the prompt's positions are the choice's."""
    count = len(http.post("/tokenize", json={"model": MODEL_NAME, "prompt": question,
                                             "add_special_tokens": False}).json()["tokens"])
    body = {"model": MODEL_NAME, "prompt": f"{question} {choice}", "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0, "return_token_ids": True, **({"steering": steering} if steering else {})}
    choice_ = http.post("/v1/completions", json=body).json()["choices"][0]
    ids, logprobs = choice_["prompt_token_ids"], choice_["prompt_logprobs"]
    return sum(logprobs[p][str(ids[p])]["logprob"] for p in range(count, len(ids))) / (len(ids) - count)


def test_capability_accuracy_unsteered_and_under_calibrated_steering(offline, server, http):
    work, _ = offline
    questions = [{"id": "w", "question": "Tell me about the weather", "choices": ["today", "bread", "train"], "answer": 0},
                 {"id": "b", "question": "To bake bread, mix flour and", "choices": ["rain", "water"], "answer": 1},
                 {"id": "t", "question": "The train leaves at", "choices": ["eight", "flour", "sunny"], "answer": 0}]
    (work / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    run = bench(server, work, "--out", str(work / "out"), "--capability", str(work / "questions.jsonl"))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    cap = summary["capability"]
    spec = http.get("/v1/steering/presets/weather").json()["steering"]  # the best method (test_save_presets)

    def expected(steering):
        return sum(max(range(len(q["choices"])), key=lambda i: independent_loglik(http, q["question"], q["choices"][i],
                                                                                  steering)) == q["answer"]
                   for q in questions) / len(questions)

    assert cap["questions"] == 3 and cap["unsteered"] == expected(None)
    weather = cap["steered"]["weather"]
    assert weather["method"] == spec["features"][0]["mode"]
    assert weather["strength"] == summary["concepts"]["weather"]["methods"][weather["method"]]["strength"]
    assert weather["accuracy"] == expected({"features": spec["features"]})
    assert set(cap["steered"]) == {"weather", "rain", "preset-weather"}
    assert "capability (3 multiple-choice questions, by likelihood): unsteered" in (work / "out" / "report.md").read_text()
