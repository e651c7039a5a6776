"""The feature-dashboards file: one SQLite database that `steerserve dashboards` writes and
`serve --feature-dashboards` reads.

Tables: `meta` (the run's settings as JSON: layers, top_n, window, histogram edges, model),
`layers` (tokens seen per layer), `docs` (ids of the documents already folded in), `features`
(per layer and index: firing count, activation sum and max, histogram counts over the edges,
top examples as JSON `[{"activation", "doc", "position", "tokens", "activations"}]`) and `lens`
(promoted and suppressed tokens); with document groups also `group_tokens` (word pieces seen per
layer and group) and `group_fired` (per feature, its firings per group as JSON). Each batch is merged and committed in one transaction with its
documents' ids, so a run that stops keeps every committed batch and a rerun skips those ids.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (layer INTEGER PRIMARY KEY, tokens INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS docs (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS features (layer INTEGER, idx INTEGER, fired INTEGER NOT NULL, sum REAL NOT NULL,
    max REAL NOT NULL, hist TEXT NOT NULL, examples TEXT NOT NULL, PRIMARY KEY (layer, idx));
CREATE TABLE IF NOT EXISTS group_tokens (layer INTEGER, grp TEXT, tokens INTEGER NOT NULL, PRIMARY KEY (layer, grp));
CREATE TABLE IF NOT EXISTS group_fired (layer INTEGER, idx INTEGER, counts TEXT NOT NULL, PRIMARY KEY (layer, idx));
CREATE TABLE IF NOT EXISTS lens (layer INTEGER, idx INTEGER, promoted TEXT NOT NULL, suppressed TEXT NOT NULL,
    PRIMARY KEY (layer, idx));
"""


class DashboardFileError(ValueError):
    pass


@dataclass
class FeatureDashboard:
    fired: int = 0
    sum: float = 0.0
    max: float = 0.0
    hist: list[int] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)  # firings per document group


class DashboardStore:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise DashboardFileError(f"{self.path}: no such file")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(_SCHEMA)
        try:
            self.settings = json.loads(self._meta("settings") or "null")
        except sqlite3.DatabaseError as exc:
            raise DashboardFileError(f"{self.path}: not a feature-dashboards file ({exc})") from None

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def start(self, settings: dict) -> None:
        """Record a new run's settings, or check a resumed run has the same ones."""
        if self.settings is None:
            self.db.execute("INSERT INTO meta VALUES ('settings', ?)", (json.dumps(settings),))
            self.db.commit()
            self.settings = settings
        elif self.settings != settings:
            changed = sorted(k for k in settings.keys() | self.settings.keys() if settings.get(k) != self.settings.get(k))
            raise DashboardFileError(f"{self.path} was built with other settings ({', '.join(changed)}); "
                                     "resume with the same ones, or write a new file")

    def done_docs(self) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT id FROM docs")}

    def tokens(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT layer, tokens FROM layers"))

    def features(self, layer: int) -> dict[int, FeatureDashboard]:
        feats = {idx: FeatureDashboard(fired, total, peak, json.loads(hist), json.loads(examples))
                 for idx, fired, total, peak, hist, examples in self.db.execute(
                     "SELECT idx, fired, sum, max, hist, examples FROM features WHERE layer = ?", (layer,))}
        if self._has_table("group_fired"):
            for idx, counts in self.db.execute("SELECT idx, counts FROM group_fired WHERE layer = ?", (layer,)):
                feats[idx].groups = json.loads(counts)
        return feats

    def group_tokens(self, layer: int) -> dict[str, int]:
        """Word pieces seen per document group at `layer` (empty without groups)."""
        if not self._has_table("group_tokens"):
            return {}
        return dict(self.db.execute("SELECT grp, tokens FROM group_tokens WHERE layer = ? ORDER BY grp", (layer,)))

    def _has_table(self, name: str) -> bool:  # a read-only file from before groups has none
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None

    def feature(self, layer: int, index: int) -> FeatureDashboard | None:
        row = self.db.execute("SELECT fired, sum, max, hist, examples FROM features WHERE layer = ? AND idx = ?",
                              (layer, index)).fetchone()
        return FeatureDashboard(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4])) if row else None

    def commit_batch(self, doc_ids: list[int], tokens: dict[int, int],
                     changed: dict[int, dict[int, FeatureDashboard]],
                     group_tokens: dict[int, dict[str, int]] | None = None) -> None:
        """One batch's documents, the tokens they added per layer (and per group) and the features
        they changed, at once."""
        with self.db:
            self.db.executemany("INSERT INTO group_tokens VALUES (?, ?, ?) ON CONFLICT(layer, grp) DO UPDATE SET "
                                "tokens = tokens + excluded.tokens",
                                [(layer, g, n) for layer, per in (group_tokens or {}).items() for g, n in per.items()])
            self.db.executemany("INSERT OR REPLACE INTO group_fired VALUES (?, ?, ?)", [
                (layer, idx, json.dumps(f.groups, ensure_ascii=False))
                for layer, feats in changed.items() for idx, f in feats.items() if f.groups])
            self.db.executemany("INSERT INTO docs VALUES (?)", [(i,) for i in doc_ids])
            self.db.executemany("INSERT INTO layers VALUES (?, ?) ON CONFLICT(layer) DO UPDATE SET "
                                "tokens = tokens + excluded.tokens", list(tokens.items()))
            self.db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (layer, idx, f.fired, f.sum, f.max, json.dumps(f.hist), json.dumps(f.examples, ensure_ascii=False))
                for layer, feats in changed.items() for idx, f in feats.items()])

    def lens_missing(self) -> list[tuple[int, int]]:
        return list(self.db.execute("SELECT f.layer, f.idx FROM features f LEFT JOIN lens l ON "
                                    "f.layer = l.layer AND f.idx = l.idx WHERE l.layer IS NULL"))

    def put_lens(self, rows: list[tuple[int, int, list, list]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO lens VALUES (?, ?, ?, ?)",
                                [(layer, idx, json.dumps(p), json.dumps(s)) for layer, idx, p, s in rows])

    def lens(self, layer: int, index: int) -> tuple[list, list] | None:
        row = self.db.execute("SELECT promoted, suppressed FROM lens WHERE layer = ? AND idx = ?",
                              (layer, index)).fetchone()
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def close(self) -> None:
        self.db.close()


def feature_fields(store: DashboardStore, layer: int, index: int) -> dict:
    """What `GET /v1/features/{layer}/{index}` adds from the file: firing rate, mean (over the
    tokens it fires on) and max activation, the histogram trimmed to its non-empty bins, and
    the top examples as tokens with per-token activations."""
    tokens = store.tokens().get(layer, 0)
    if store.settings is None or layer not in store.settings["layers"] or tokens == 0:
        return {}
    f = store.feature(layer, index) or FeatureDashboard(hist=[0] * store.settings["bins"])
    nonzero = [i for i, c in enumerate(f.hist) if c]
    lo, hi = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, 0)
    return {"firing_rate": f.fired / tokens, "mean_activation": f.sum / f.fired if f.fired else 0.0,
            "max_activation": f.max,
            "histogram": {"edges": store.settings["edges"][lo: hi + 1] if nonzero else [], "counts": f.hist[lo:hi]},
            "top_examples": [{"tokens": e["tokens"], "activations": e["activations"]} for e in f.examples]}


class DashboardIndex:
    """The served file, with each feature's example text held lower-cased for search. A file a
    running `steerserve dashboards` is still filling is served as committed so far: the text
    index is rebuilt when more documents have been committed."""

    def __init__(self, store: DashboardStore):
        self.store = store
        self._docs = -1
        self._texts: dict[tuple[int, int], str] = {}

    def _refresh(self) -> None:
        docs = self.store.db.execute("SELECT count(*) FROM docs").fetchone()[0]
        if docs == self._docs:
            return
        if self.store.settings is None:
            self.store.settings = json.loads(self.store._meta("settings") or "null")
        self._docs = docs
        self._texts = {(layer, idx): " | ".join("".join(e["tokens"]) for e in f.examples).lower()
                       for layer in (self.store.settings or {}).get("layers", ())
                       for idx, f in self.store.features(layer).items()}

    def fields(self, layer: int, index: int) -> dict:
        self._refresh()
        return feature_fields(self.store, layer, index)

    def search(self, query: str, layer: int | None = None) -> list[tuple[int, int, int]]:
        """(layer, index, number of top examples containing the text), most first."""
        q = query.strip().lower()
        if not q:
            return []
        self._refresh()
        hits = [(lyr, idx, text.count(q)) for (lyr, idx), text in self._texts.items()
                if (layer is None or lyr == layer) and q in text]
        return sorted(hits, key=lambda h: (-h[2], h[0], h[1]))
