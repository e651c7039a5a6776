"""`steerserve bench-steering`: every concept's methods on every instruction, judged, with each
method's strength chosen on the selection half and every reported number from the report half.

Like `eval` and `dashboards` it starts a private server (MODEL and serve options) or uses
`--base-url` (with `--api-key`). Answers are chat completions, greedy unless --temperature, all
sent concurrently (--concurrency at a time). Three rounds: the unsteered answers first (offline
judging needs their likelihood as the fluency baseline), then every method at every strength on
both halves, then `prompt+M` at each method M's chosen strength on the report half. Each judged
answer is appended to scores.jsonl at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from steerserve.analysis.steering_bench import capability, language_judge, offline_judges, report, scoring
from steerserve.analysis.steering_bench.calibration import save_presets
from steerserve.analysis.steering_bench.capability import BUILTIN_CAPABILITY, read_questions
from steerserve.analysis.steering_bench.inputs import (
    BUILTIN_INSTRUCTIONS, BenchInputError, Concept, Instruction, instructions_for, read_concepts, read_instructions,
)
from steerserve.analysis.steering_bench.llm_judge import JudgeError, LLMJudge
from steerserve.analysis.steering_bench.methods import FIXED, Edit, ResolveError, Steered, random_edits, resolve
from steerserve.analysis.steering_bench.store import RunStore
from steerserve.cli.help import DefaultsFormatter
from steerserve.serve_process import (
    ServerStartError, add_server_options, parse_server_args, require_server, server_client,
)

JUDGE_KEY_ENV = "STEERSERVE_JUDGE_API_KEY"


class RunError(RuntimeError):
    """A request the run cannot go on without; the message names the concept and line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="steerserve bench-steering", allow_abbrev=False,
                                description="measure steering methods against prompting on a set of concepts",
                                epilog="Every other argument (MODEL, --sae, vLLM options) goes to `steerserve serve`.")
    p.add_argument("--concepts", type=Path, required=True, help="JSONL, one concept a line (see README)")
    p.add_argument("--instructions", type=Path, default=BUILTIN_INSTRUCTIONS,
                   help="JSONL {\"id\", \"prompt\", \"language\"?} (default: 44 built-in, English/German/Spanish/Italian)")
    p.add_argument("--out", type=Path, required=True, help="scores.jsonl, summary.json, report.md (resumed if there)")
    p.add_argument("--strengths", default="1,2,4,8",
                   help="multiples of each feature's mean activation / vector's norm / preset's values")
    p.add_argument("--methods", default=None, help="run only these (e.g. none,prompt,clamp); default: all that apply")
    p.add_argument("--max-tokens", type=int, default=32, metavar="N", help="tokens per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="the split, random controls, bootstrap and sampling")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--save-presets", action="store_true",
                   help="store each concept's best steering method at its chosen strength as a preset named after it")
    p.add_argument("--capability", type=Path, nargs="?", const=BUILTIN_CAPABILITY, default=None,
                   help="multiple-choice JSONL to measure accuracy on, unsteered and under each concept's best "
                        "steering (alone: the built-in 20 proverb endings; default: none)")
    p.add_argument("--judge-url", help="an OpenAI-compatible endpoint to judge with (default: the offline judges)")
    p.add_argument("--judge-model", help="the judge's model name (with --judge-url; default: none)")
    p.add_argument("--judge-api-key", default=None, help=f"the judge's key (default: ${JUDGE_KEY_ENV})")
    add_server_options(p)
    return p


@dataclass(frozen=True)
class Job:
    steered: Steered
    method: str
    strength: float | None
    instruction: Instruction
    split: str


def _strengths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise BenchInputError(f"--strengths {text!r}: give numbers, e.g. 1,2,4,8") from None
    if not values or any(v <= 0 for v in values):
        raise BenchInputError(f"--strengths {text!r}: give positive numbers, e.g. 1,2,4,8")
    return values


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def main(argv: list[str]) -> int:
    args, serve_args = parse_server_args(_parser(), argv)
    require_server(_parser(), args.base_url, serve_args)
    if (args.judge_url is None) != (args.judge_model is None):
        _parser().error("--judge-url and --judge-model go together")
    try:
        concepts = read_concepts(args.concepts)
        instructions = read_instructions(args.instructions)
        strengths = _strengths(args.strengths)
        if args.concurrency < 1 or args.max_tokens < 1:
            raise BenchInputError("--concurrency and --max-tokens must be at least 1")
        questions = read_questions(args.capability) if args.capability else None
        if args.judge_url is None:
            for concept in concepts:
                if concept.language is None and concept.source == "vector":
                    raise BenchInputError(f"{concept.where}: concept {concept.name!r}: a stored vector has no feature "
                                          "to judge it by offline: give judge.language, or --judge-url")
    except BenchInputError as exc:
        print(f"bench-steering: {exc}", file=sys.stderr)
        return 1
    judge = (LLMJudge(args.judge_url, args.judge_model, args.judge_api_key or os.environ.get(JUDGE_KEY_ENV))
             if args.judge_url else None)
    started = time.monotonic()
    try:
        with server_client(args.base_url, serve_args, args.server_log, timeout=600) as http:
            bench = Bench(http, args, judge, strengths)
            summary = bench.run(concepts, instructions)
            if args.save_presets:
                summary["presets"] = save_presets(http, bench.steered, summary)
            if questions:
                summary["capability"] = capability.measure(http, bench.model, questions, bench.steered, summary,
                                                           args.concurrency)
    except (ServerStartError, BenchInputError, ResolveError, RunError, JudgeError,
            offline_judges.ServerJudgeError) as exc:
        print(f"bench-steering: {exc}", file=sys.stderr)
        return 1
    finally:
        if judge is not None:
            judge.close()
    seconds = time.monotonic() - started
    summary["seconds"] = round(seconds, 1)
    report.write(args.out, summary, list(bench.store.rows.values()))
    print(report.table(summary))
    print(f"\nbench-steering: {summary['generated']} answers generated in {seconds:.0f} s; "
          f"report in {args.out / 'report.md'}")
    return 0


class Bench:
    def __init__(self, http: httpx.Client, args: argparse.Namespace, judge: LLMJudge | None,
                 strengths: tuple[float, ...]):
        self.http, self.args, self.judge, self.strengths = http, args, judge, strengths
        self.store = RunStore(args.out)
        self.model = _ok(http.get("/v1/models"), "GET /v1/models")["data"][0]["id"]
        self._answers: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.generated = 0
        self.baseline: float | None = None
        self.randoms: dict[str, tuple[Edit, ...]] = {}
        self.steered: list[Steered] = []

    def run(self, concepts: list[Concept], instructions: list[Instruction]) -> dict:
        saes = _ok(self.http.get("/v1/saes"), "GET /v1/saes")
        d_sae = {info["layer"]: info["d_sae"] for info in saes["data"]}
        self.steered = steered = [resolve(self.http, c) for c in concepts]
        for s in steered:
            self.randoms[s.concept.name] = random_edits(s, d_sae, saes["d_model"], self.args.seed)
        wanted = None if self.args.methods is None else set(self.args.methods.split(","))
        known = {m for s in steered for m in (*s.methods, *(f"prompt+{x}" for x in s.swept))}
        if wanted is not None and wanted - known:
            raise BenchInputError(f"--methods: {', '.join(sorted(wanted - known))} is no method of these concepts "
                                  f"(they have {', '.join(sorted(known))})")
        settings = {"model": self.model, "seed": self.args.seed, "strengths": list(self.strengths),
                    "max_tokens": self.args.max_tokens, "temperature": self.args.temperature,
                    "judge": self.judge.name if self.judge else "offline",
                    "concepts": {s.concept.name: _digest([asdict(s.concept) | {"where": None}, s.edits]) for s in steered},
                    "instructions": {i.id: _digest(asdict(i)) for i in instructions}}
        settings = self.store.open(settings)
        halves = scoring.split([i.id for i in instructions], self.args.seed)
        if self.judge is None:
            self.baseline = settings.get("fluency_baseline")
            if self.baseline is None:
                self.baseline = self._fluency_baseline(steered, instructions)
                self.store.save_settings(settings | {"fluency_baseline": self.baseline})
        jobs = [Job(s, m, strength, i, halves[i.id])
                for s in steered for m in s.methods if wanted is None or m in wanted
                for strength in ((None,) if m in FIXED else self.strengths)
                for i in instructions_for(s.concept, instructions)]
        self._run_jobs(jobs, "methods")
        chosen = {s.concept.name: self._choose(s) for s in steered}
        jobs = [Job(s, f"prompt+{m}", chosen[s.concept.name][m], i, scoring.REPORT)
                for s in steered for m in s.swept if m in chosen[s.concept.name]
                and (wanted is None or f"prompt+{m}" in wanted)
                for i in instructions_for(s.concept, instructions) if halves[i.id] == scoring.REPORT]
        self._run_jobs(jobs, "prompt+steer")
        summary = report.summarise(steered, chosen, list(self.store.rows.values()), self.args.seed)
        summary |= {"model": self.model, "judge": settings["judge"], "relevance_judged": self.judge is not None,
                    "fluency_baseline_nll": self.baseline, "strengths": list(self.strengths),
                    "instructions": {"selection": sum(h == scoring.SELECTION for h in halves.values()),
                                     "report": sum(h == scoring.REPORT for h in halves.values())},
                    "generated": self.generated}
        return summary

    def _choose(self, steered: Steered) -> dict[str, float]:
        """Each swept method's strength, from its selection-half harmonic means."""
        chosen = {}
        name = steered.concept.name
        for method in steered.swept:
            by_strength = {s: [r["harmonic"] for r in self.store.rows.values()
                               if r["concept"] == name and r["method"] == method and r["strength"] == s
                               and r["split"] == scoring.SELECTION and r["harmonic"] is not None]
                           for s in self.strengths}
            if any(by_strength.values()):
                chosen[method] = scoring.choose_strength(by_strength)
        return chosen

    def _fluency_baseline(self, steered: list[Steered], instructions: list[Instruction]) -> float:
        """Mean per-token NLL of the unsteered answers to every instruction any concept uses."""
        used = [i for i in instructions if any(i in instructions_for(s.concept, instructions) for s in steered)]
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            nlls = list(tqdm(pool.map(lambda i: offline_judges.answer_nll(
                self.http, self.model, self._answer(steered[0], "none", None, i)), used),
                total=len(used), desc="fluency baseline", unit="answer", file=sys.stderr))
        judged = [n for n in nlls if n is not None]
        if not judged:
            raise RunError("no unsteered answer has text: the fluency baseline cannot be measured")
        return sum(judged) / len(judged)

    def _run_jobs(self, jobs: list[Job], stage: str) -> None:
        todo = [j for j in jobs if (j.steered.concept.name, j.method, j.strength, j.instruction.id) not in self.store.rows]
        if not todo:
            return
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            futures = [pool.submit(self._score, job) for job in todo]
            with tqdm(total=len(todo), desc=f"bench-steering: {stage}", unit="answer", file=sys.stderr) as bar:
                for future in futures:
                    try:
                        future.result()
                    except BaseException:
                        for other in futures:
                            other.cancel()
                        raise
                    bar.update()

    def _prompt(self, steered: Steered, method: str, instruction: Instruction) -> str:
        if method == "prompt" or method.startswith("prompt+"):
            return f"{instruction.prompt}\n\n{steered.concept.ask()}"
        return instruction.prompt

    def _answer(self, steered: Steered, method: str, strength: float | None, instruction: Instruction) -> str:
        """The answer's text; one request per distinct (prompt, steering), whichever concept asks."""
        spec = steered.spec(method, strength, self.randoms[steered.concept.name])
        body = {"model": self.model, "messages": [{"role": "user", "content": self._prompt(steered, method, instruction)}],
                "max_tokens": self.args.max_tokens, "temperature": self.args.temperature, "seed": self.args.seed}
        if spec is not None:
            body["steering"] = spec
        key = json.dumps(body, sort_keys=True)
        with self._lock:
            future = self._answers.get(key)
            owner = future is None
            if owner:
                future = self._answers[key] = Future()
        if owner:
            try:
                response = self.http.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    raise RunError(f"{steered.concept.where}: concept {steered.concept.name!r}, method {method}"
                                   f"{'' if strength is None else f' at strength {strength:g}'}: the server answered "
                                   f"{response.status_code}: {response.text[:300]}")
                future.set_result(response.json()["choices"][0]["message"]["content"] or "")
                with self._lock:
                    self.generated += 1
            except BaseException as exc:
                future.set_exception(exc)
        return future.result()

    def _score(self, job: Job) -> None:
        concept = job.steered.concept
        text = self._answer(job.steered, job.method, job.strength, job.instruction)
        row = {"concept": concept.name, "method": job.method, "strength": job.strength,
               "instruction": job.instruction.id, "split": job.split, "text": text}
        if self.judge is not None:
            try:
                verdict = self.judge.judge(job.instruction.prompt, concept.description, text)
            except JudgeError as exc:
                raise JudgeError(f"{exc} (judging concept {concept.name!r}, {concept.where})") from None
            scores, unparsed = verdict.scores, list(verdict.unparsed)
            row |= {"judge": self.judge.name, "judge_answers": verdict.raw}
        else:
            if concept.language is not None:
                score = language_judge.concept_score(text, language_judge.language_code(concept.language))
            else:
                share = offline_judges.firing_share(self.http, text, job.steered.judge_features)
                score = offline_judges.firing_score(share)
                row["firing_share"] = round(share, 4)
            nll = offline_judges.answer_nll(self.http, self.model, text)
            scores = {"concept": score, "relevance": None, "fluency": offline_judges.fluency_score(nll, self.baseline)}
            unparsed = []
            row |= {"judge": "offline", "nll": None if nll is None else round(nll, 4)}
        row |= {"concept_score": scores["concept"], "relevance": scores["relevance"], "fluency": scores["fluency"],
                "harmonic": None if unparsed else round(scoring.harmonic(
                    (scores["concept"], scores["relevance"], scores["fluency"])), 4),
                "unparsed": unparsed}
        self.store.add(row)


def _ok(response: httpx.Response, what: str) -> dict:
    if response.status_code != 200:
        raise RunError(f"{what}: the server answered {response.status_code}: {response.text[:300]}")
    return response.json()
