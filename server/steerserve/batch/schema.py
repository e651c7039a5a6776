"""The batch database's tables, their upgrade from older releases, and the one connection.

Why SQLite, and why this is the truth a batch's state is read from: store.py. One connection
shared by threads (`check_same_thread=False`) behind a lock; every query is short and
synchronous, and async callers run it with `asyncio.to_thread`. WAL mode lets readers (other API
processes, `sqlite3` in a shell) see the state while a batch runs.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    status      TEXT NOT NULL DEFAULT 'processed'
);
CREATE TABLE IF NOT EXISTS batches (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    input_file_id     TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    metadata          TEXT,
    errors            TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    total             INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    expires_at        INTEGER,
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id    TEXT NOT NULL,
    line_index  INTEGER NOT NULL,
    custom_id   TEXT,
    url         TEXT,
    body        TEXT,
    PRIMARY KEY (batch_id, line_index)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batch_results (
    batch_id    TEXT NOT NULL,
    line_index  INTEGER NOT NULL,
    ok          INTEGER NOT NULL,
    record      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (batch_id, line_index)
) WITHOUT ROWID;
"""
# Columns added after the first release (ALTER TABLE at open, so existing data dirs still open).
ADDED_COLUMNS = {
    "batch_lines": {"attempts": "INTEGER NOT NULL DEFAULT 0"},
    # Drawn once at finalize, before the files are written: a re-run after a crash reuses them.
    "batches": {"reserved_output_file_id": "TEXT", "reserved_error_file_id": "TEXT",
                # The identity key of the server that accepted the batch (identity.py): only its
                # runner claims it. NULL for batches of older releases, which any runner runs.
                "server_id": "TEXT"},
}


class Database:
    """The connection, its transactions and the schema, brought up to date when opened."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(db_path, check_same_thread=False, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a committed line result survives power loss too
        self._conn.executescript(SCHEMA)
        self._add_missing_columns()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self):
        """`with self._tx() as c:` runs the block in one IMMEDIATE transaction under the lock."""
        db = self

        class _Tx:
            def __enter__(self):
                db._lock.acquire()
                db._conn.execute("BEGIN IMMEDIATE")
                return db._conn

            def __exit__(self, exc_type, exc, tb):
                try:
                    db._conn.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    db._lock.release()
                return False

        return _Tx()

    def _add_missing_columns(self) -> None:
        """Bring a database created by an older release up to date (in a transaction, so two
        processes opening it at once do not both add a column)."""
        with self._tx() as c:
            for table, columns in ADDED_COLUMNS.items():
                present = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns.items():
                    if name not in present:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()
