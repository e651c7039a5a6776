"""The benchmark's inputs: concepts (what to steer towards, and how) and instructions (what to
ask while steering), each a JSONL file read whole before any request, so a bad line stops the
run before a server starts, with an error naming the file, the line and the concept.

A concept line: `{"name", "description", ...}` plus exactly one of
  "features": [{"layer", "index", "mean_activation"?}]   SAE features (clamp, add, ablate)
  "preset": NAME                                          a stored preset (scaled as a whole)
  "vector": NAME, "layer": N                              a stored vector (add, ablate)
  "contrast": {"positive": [...], "negative": [...], "layers": [...]}   the CAA direction
and optionally "judge": {"language": "German"} (the exact language judge) and "prompt" (the
sentence the `prompt` method appends to an instruction; default: the description asked for).
An instruction line: `{"id", "prompt", "language"?}`; an instruction whose language is a
concept's judge language already shows the concept, so that concept skips it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_INSTRUCTIONS = Path(__file__).with_name("instructions.jsonl")
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
SOURCES = ("features", "preset", "vector", "contrast")


class BenchInputError(ValueError):
    """A bad concept or instruction line; the message names the file and line."""


@dataclass(frozen=True)
class FeatureRef:
    layer: int
    index: int
    mean_activation: float | None  # from the concept line; else read from the server


@dataclass(frozen=True)
class Contrast:
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Concept:
    name: str
    description: str
    where: str  # "FILE:LINE", for every later error about this concept
    features: tuple[FeatureRef, ...] = ()
    preset: str | None = None
    vector: str | None = None
    layer: int | None = None  # the stored vector's layer
    contrast: Contrast | None = None
    language: str | None = None  # judge.language: lingua's name of the language
    prompt: str | None = None

    @property
    def source(self) -> str:
        return "features" if self.features else "preset" if self.preset else "vector" if self.vector else "contrast"

    def ask(self) -> str:
        """The sentence the `prompt` method appends to each instruction."""
        return self.prompt or f"In your answer, make sure that it {self.description}."


@dataclass(frozen=True)
class Instruction:
    id: str
    prompt: str
    language: str | None = None


def _lines(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchInputError(f"{path}: cannot read it ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchInputError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise BenchInputError(f"{path}:{number}: expected a JSON object")
        rows.append((number, row))
    if not rows:
        raise BenchInputError(f"{path}: no lines")
    return rows


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _texts(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of texts")
    return tuple(_text(v, f"{what}[{i}]") for i, v in enumerate(value))


def _feature(value: Any, i: int) -> FeatureRef:
    if not isinstance(value, dict) or set(value) - {"layer", "index", "mean_activation"}:
        raise ValueError(f"features[{i}] must be {{\"layer\", \"index\", \"mean_activation\"?}}")
    mean = value.get("mean_activation")
    if mean is not None and (isinstance(mean, bool) or not isinstance(mean, (int, float))
                             or not math.isfinite(mean) or mean <= 0):
        raise ValueError(f"features[{i}].mean_activation must be a positive number")
    return FeatureRef(_int(value.get("layer"), f"features[{i}].layer"),
                      _int(value.get("index"), f"features[{i}].index"), mean)


def _concept(row: dict, where: str) -> Concept:
    allowed = {"name", "description", "judge", "prompt", "layer", *SOURCES}
    if unknown := sorted(set(row) - allowed):
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    name = _text(row.get("name"), "name")
    if not set(name) <= NAME_CHARS or len(name) > 64:
        raise ValueError("name must be 1 to 64 characters of A-Z a-z 0-9 . _ : - (it names a preset)")
    given = [s for s in SOURCES if s in row]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(SOURCES)} (got {', '.join(given) or 'none'})")
    fields: dict[str, Any] = {"name": name, "description": _text(row.get("description"), "description"),
                              "where": where}
    if "prompt" in row:
        fields["prompt"] = _text(row["prompt"], "prompt")
    if "layer" in row and given != ["vector"]:
        raise ValueError("`layer` goes with `vector` only")
    if given == ["features"]:
        if not isinstance(row["features"], list) or not row["features"]:
            raise ValueError("features must be a non-empty list of {\"layer\", \"index\"}")
        fields["features"] = tuple(_feature(f, i) for i, f in enumerate(row["features"]))
        if len(set((f.layer, f.index) for f in fields["features"])) != len(fields["features"]):
            raise ValueError("features lists a feature twice")
    elif given == ["preset"]:
        fields["preset"] = _text(row["preset"], "preset")
    elif given == ["vector"]:
        fields["vector"] = _text(row["vector"], "vector")
        fields["layer"] = _int(row.get("layer"), "layer (the vector's layer)")
    else:
        contrast = row["contrast"]
        if not isinstance(contrast, dict) or set(contrast) != {"positive", "negative", "layers"}:
            raise ValueError("contrast must be {\"positive\": [...], \"negative\": [...], \"layers\": [...]}")
        if not isinstance(contrast["layers"], list) or not contrast["layers"]:
            raise ValueError("contrast.layers must be a non-empty list of layers")
        fields["contrast"] = Contrast(_texts(contrast["positive"], "contrast.positive"),
                                      _texts(contrast["negative"], "contrast.negative"),
                                      tuple(_int(v, f"contrast.layers[{i}]") for i, v in enumerate(contrast["layers"])))
    if "judge" in row:
        judge = row["judge"]
        if not isinstance(judge, dict) or set(judge) != {"language"}:
            raise ValueError("judge must be {\"language\": NAME} (the only exact judge there is)")
        fields["language"] = language_name(_text(judge["language"], "judge.language"))
    return Concept(**fields)


def language_name(name: str) -> str:
    """`name` as the language judge knows it (lingua's names, e.g. German); ValueError if unknown."""
    from steerserve.analysis.steering_bench.language_judge import language_code

    language_code(name)
    return name


def read_concepts(path: Path) -> list[Concept]:
    concepts: list[Concept] = []
    seen: dict[str, str] = {}
    for number, row in _lines(path):
        where = f"{path}:{number}"
        label = f" concept {row['name']!r}" if isinstance(row.get("name"), str) else ""
        try:
            concept = _concept(row, where)
        except ValueError as exc:
            raise BenchInputError(f"{where}:{label} {exc}") from None
        if concept.name in seen:
            raise BenchInputError(f"{where}:{label} the name is taken by the concept at {seen[concept.name]}")
        seen[concept.name] = where
        concepts.append(concept)
    return concepts


def read_instructions(path: Path) -> list[Instruction]:
    instructions: list[Instruction] = []
    seen: set[str] = set()
    for number, row in _lines(path):
        where = f"{path}:{number}"
        if set(row) - {"id", "prompt", "language"}:
            raise BenchInputError(f"{where}: an instruction is {{\"id\", \"prompt\", \"language\"?}}")
        ident = row.get("id")
        if isinstance(ident, int) and not isinstance(ident, bool):
            ident = str(ident)
        try:
            instruction = Instruction(_text(ident, "id"), _text(row.get("prompt"), "prompt"),
                                      None if row.get("language") is None else _text(row["language"], "language"))
        except ValueError as exc:
            raise BenchInputError(f"{where}: {exc}") from None
        if instruction.id in seen:
            raise BenchInputError(f"{where}: instruction id {instruction.id!r} appears twice")
        seen.add(instruction.id)
        instructions.append(instruction)
    if len(instructions) < 2:
        raise BenchInputError(f"{path}: at least 2 instructions are needed (one to choose strengths on, one to report)")
    return instructions


def instructions_for(concept: Concept, instructions: list[Instruction]) -> list[Instruction]:
    """The instructions a concept is measured on: those not already in its judge language."""
    return [i for i in instructions if concept.language is None or i.language != concept.language]
