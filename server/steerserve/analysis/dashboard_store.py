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

import asyncio
import json
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

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


INDEX_BYTES = 256 * 2**20  # example text held in memory for search; the rest is read from the file per search


class DashboardIndex:
    """The served file, with each feature's example text held lower-cased for search (up to
    `max_bytes` of it; a search reads the features past that from the file). A file a running
    `steerserve dashboards` is still filling is served as committed so far: when another
    connection has committed since the last build, the next request starts a rebuild in a thread
    (one at a time, on its own connection) and is answered from the previous index meanwhile,
    so no request waits for it and the event loop never parses the file. Every read of the file
    runs in a thread too (a writer's commit may hold its lock), one at a time on the shared
    connection."""

    def __init__(self, store: DashboardStore, max_bytes: int = INDEX_BYTES):
        self.store = store
        self.max_bytes = max_bytes
        self._index: _TextIndex | None = None  # None until the first build
        self._built_version = -1  # the connection's data_version the index was built at
        self._rebuild: asyncio.Task | None = None
        self._lock = threading.Lock()

    async def read(self, query: Callable[..., T], *args) -> T:
        """`query(store.db, *args)` in a thread, one at a time."""
        def locked() -> T:
            with self._lock:
                return query(self.store.db, *args)
        return await asyncio.to_thread(locked)

    async def _current(self) -> "_TextIndex":
        """The newest built index; starts a rebuild if the file changed (waits only for the first)."""
        if self._rebuild is None or self._rebuild.done():
            version = await self.read(lambda db: db.execute("PRAGMA data_version").fetchone()[0])
            if version != self._built_version:
                self._rebuild = asyncio.create_task(asyncio.to_thread(self._build, version))
        if self._index is None:
            await asyncio.shield(self._rebuild)
        return self._index

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True, isolation_level=None)

    def _build(self, version: int) -> None:
        """Feature texts in (layer, index) order until `max_bytes`, read in one transaction."""
        texts: dict[int, dict[int, str]] = {}  # int keys: nothing for the garbage collector to walk
        size, rest = 0, None
        db = self._connect()
        try:
            db.execute("BEGIN")
            for layer, idx, text in _feature_texts(db):
                size += sys.getsizeof(text)
                if size > self.max_bytes:
                    rest = layer, idx
                    break
                texts.setdefault(layer, {})[idx] = text
        finally:
            db.close()
        self._index, self._built_version = _TextIndex(texts, rest), version

    async def fields(self, layer: int, index: int) -> dict:
        def read(_) -> dict:
            if self.store.settings is None:  # an empty file the command has started filling since
                self.store.settings = json.loads(self.store._meta("settings") or "null")
            return feature_fields(self.store, layer, index)
        return await self.read(read)

    async def search(self, query: str, layer: int | None = None) -> list[tuple[int, int, int]]:
        """(layer, index, number of top examples containing the text), most first."""
        q = query.strip().lower()
        if not q:
            return []
        index = await self._current()
        return await asyncio.to_thread(self._search, index, q, layer)

    def _search(self, index: "_TextIndex", q: str, layer: int | None) -> list[tuple[int, int, int]]:
        hits = [(lyr, idx, text.count(q)) for lyr, texts in index.texts.items() if layer is None or lyr == layer
                for idx, text in texts.items() if q in text]
        if index.rest is not None:
            db = self._connect()
            try:
                hits += [(lyr, idx, text.count(q)) for lyr, idx, text in _feature_texts(db, index.rest)
                         if (layer is None or lyr == layer) and q in text]
            finally:
                db.close()
        return sorted(hits, key=lambda h: (-h[2], h[0], h[1]))


@dataclass
class _TextIndex:
    texts: dict[int, dict[int, str]]  # per layer and index
    rest: tuple[int, int] | None  # the first feature not held (None: all are)


# A feature's examples as one text, each example's tokens joined, examples joined by " | ".
# SQLite builds it (the sqlite3 module releases the GIL while it does, so a build in a thread
# leaves the event loop free); Python only lower-cases it (SQLite's lower() knows ASCII only).
_TEXTS = """SELECT idx, coalesce((SELECT group_concat(text, ' | ') FROM (
    SELECT (SELECT group_concat(t.value, '') FROM json_each(e.value, '$.tokens') t) AS text
    FROM json_each(f.examples) e)), '')
FROM features f WHERE layer = ? AND idx >= ? ORDER BY idx"""


def _feature_texts(db: sqlite3.Connection, start: tuple[int, int] = (-1, -1)) -> Iterator[tuple[int, int, str]]:
    """(layer, index, its examples' text lower-cased) of the file's layers, in order, from `start`."""
    row = db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
    layers = sorted((json.loads(row[0]) or {}).get("layers", ())) if row else []
    for layer in layers:
        if layer >= start[0]:
            for idx, text in db.execute(_TEXTS, (layer, start[1] if layer == start[0] else -1)):
                yield layer, idx, text.lower()
