"""Feature labels from an auto-interpretation export, and ranked text search over them.

The file is JSONL, one `{"layer", "index", "label", "description"?}` per line (the export
shape of common auto-interp tools). It is read once at start-up; a bad line stops start-up
with the file, line number and what was wrong. Features without a label are fine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


class LabelsFileError(ValueError):
    pass


@dataclass(frozen=True)
class FeatureLabel:
    layer: int
    index: int
    label: str
    description: str | None = None


class FeatureLabels:
    def __init__(self, labels: list[FeatureLabel] | None = None):
        self._by_feature = {(f.layer, f.index): f for f in labels or []}

    def __len__(self) -> int:
        return len(self._by_feature)

    def get(self, layer: int, index: int) -> FeatureLabel | None:
        return self._by_feature.get((layer, index))

    def search(self, query: str, layer: int | None = None) -> list[tuple[float, FeatureLabel]]:
        """Case-insensitive; best first: exact label, label prefix, whole word in label,
        substring of label, then substring of description; ties by (layer, index)."""
        q = query.strip().lower()
        if not q:
            return []
        word = re.compile(rf"\b{re.escape(q)}\b")
        hits = []
        for f in self._by_feature.values():
            if layer is not None and f.layer != layer:
                continue
            label, description = f.label.lower(), (f.description or "").lower()
            if label == q:
                score = 5.0
            elif label.startswith(q):
                score = 4.0
            elif word.search(label):
                score = 3.0
            elif q in label:
                score = 2.0
            elif q in description:
                score = 1.0
            else:
                continue
            hits.append((score, f))
        hits.sort(key=lambda h: (-h[0], h[1].layer, h[1].index))
        return hits


def load_labels(path: str | Path) -> FeatureLabels:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsFileError(f"{path}: cannot read the labels file ({exc})") from None
    labels, seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise LabelsFileError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise LabelsFileError(f"{where}: expected an object with layer, index, label")
        for key, kind in (("layer", int), ("index", int), ("label", str)):
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise LabelsFileError(f"{where}: '{key}' must be {'an integer' if kind is int else 'a string'}")
        description = row.get("description")
        if description is not None and not isinstance(description, str):
            raise LabelsFileError(f"{where}: 'description' must be a string")
        key = (row["layer"], row["index"])
        if key in seen:
            raise LabelsFileError(f"{where}: layer {key[0]} feature {key[1]} is already labelled on line {seen[key]}")
        seen[key] = number
        labels.append(FeatureLabel(row["layer"], row["index"], row["label"], description))
    return FeatureLabels(labels)
