"""The run's files in --out: `run.json` (the settings a rerun must share, and the offline fluency
baseline once measured) and `scores.jsonl` (one scored answer a line, appended as each is
judged). A rerun loads both and scores only what is missing; a last line cut off by a crash is
dropped (and scored again), any other bad line is an error naming it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from steerserve.analysis.steering_bench.inputs import BenchInputError

Key = tuple[str, str, float | None, str]  # concept, method, strength, instruction id


def row_key(row: dict) -> Key:
    return row["concept"], row["method"], row["strength"], row["instruction"]


class RunStore:
    def __init__(self, out: Path):
        self.out = out
        self.scores_path = out / "scores.jsonl"
        self.settings_path = out / "run.json"
        self._lock = threading.Lock()
        self.rows: dict[Key, dict] = {}

    def open(self, settings: dict) -> dict:
        """Check `settings` against a stored run (BenchInputError naming what differs), merge the
        concepts and instructions it adds, load the scored rows; the merged settings."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.settings_path.exists():
            stored = json.loads(self.settings_path.read_text())
            for key, value in settings.items():
                if key in ("concepts", "instructions"):
                    changed = sorted(n for n in value.keys() & stored.get(key, {}).keys() if value[n] != stored[key][n])
                    if changed:
                        raise BenchInputError(f"{self.out} holds a run whose {key} {', '.join(changed)} were defined "
                                              "differently: restore them or use another --out")
                    stored[key] = stored.get(key, {}) | value
                elif stored.get(key) != value:
                    raise BenchInputError(f"{self.out} holds a run with {key} = {stored.get(key)!r}, not {value!r}: "
                                          "rerun with the same options or use another --out")
            settings = stored
        self.save_settings(settings)
        if self.scores_path.exists():
            lines = self.scores_path.read_text(encoding="utf-8").split("\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # cut off mid-write: scored again
                        break
                    raise BenchInputError(f"{self.scores_path}:{number}: not JSON; remove the line to rescore it") from None
                self.rows[row_key(row)] = row
            self.scores_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows.values()),
                                        encoding="utf-8")
        return settings

    def save_settings(self, settings: dict) -> None:
        self.settings_path.write_text(json.dumps(settings, indent=1, ensure_ascii=False) + "\n")

    def add(self, row: dict) -> None:
        with self._lock:
            key = row_key(row)
            if key in self.rows:
                raise RuntimeError(f"scored twice: {key}")
            self.rows[key] = row
            with self.scores_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
