"""The `explanations` table of the feature-dashboards file (analysis/dashboard_store.py).

One row per feature the explainer was asked about: the one-line text (NULL when the request
failed, with the reason in `error`, so a rerun asks again), the explainer model, the detection
score and how many held-out and random contexts it compared. A file from before explanations has
no such table: it still loads and simply has none; a writer creates the table on first use.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

_TABLE = """CREATE TABLE IF NOT EXISTS explanations (layer INTEGER, idx INTEGER, text TEXT, model TEXT NOT NULL,
    score REAL, held_out INTEGER NOT NULL, random INTEGER NOT NULL, error TEXT, PRIMARY KEY (layer, idx))"""


@dataclass
class Explanation:
    layer: int
    index: int
    text: str | None
    model: str
    score: float | None  # detection score, 0..1 (0.5: chance); None without held-out or random contexts
    held_out: int
    random: int
    error: str | None


def _exists(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'explanations'").fetchone() is not None


def explained(db: sqlite3.Connection) -> set[tuple[int, int]]:
    """Features that have an explanation (failed ones are asked again)."""
    if not _exists(db):
        return set()
    return set(db.execute("SELECT layer, idx FROM explanations WHERE text IS NOT NULL"))


def put(db: sqlite3.Connection, rows: list[Explanation]) -> None:
    with db:
        db.execute(_TABLE)
        db.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(r.layer, r.index, r.text, r.model, r.score, r.held_out, r.random, r.error) for r in rows])


def served(db: sqlite3.Connection, layer: int, index: int) -> dict | None:
    """What `GET /v1/features/{layer}/{index}` shows as `explanation`."""
    if not _exists(db):
        return None
    row = db.execute("SELECT text, model, score, held_out, random FROM explanations "
                     "WHERE layer = ? AND idx = ? AND text IS NOT NULL", (layer, index)).fetchone()
    return None if row is None else {"text": row[0], "model": row[1], "detection_score": row[2],
                                     "held_out": row[3], "random": row[4]}


def search(db: sqlite3.Connection, query: str, layer: int | None) -> list[tuple[int, int, str]]:
    """(layer, index, text) of the explanations containing `query` (case-insensitive), by layer and index."""
    q = query.strip().lower()
    if not q or not _exists(db):
        return []
    rows = db.execute("SELECT layer, idx, text FROM explanations WHERE text IS NOT NULL AND (? IS NULL OR layer = ?) "
                      "ORDER BY layer, idx", (layer, layer))
    return [(lyr, idx, text) for lyr, idx, text in rows if q in text.lower()]  # SQLite lowers ASCII only
