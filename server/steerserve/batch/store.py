"""SQLite state of files and batches: the single source of truth the runner reconciles from.

Why SQLite: a batch must survive `kill -9`. Each line's result is one row keyed by
(batch_id, line_index), inserted in a transaction that also checks the batch is still running,
so a line is done exactly when its row exists: after a crash the pending lines are just the
lines without a row, and output files are rebuilt from rows at finalize. Request counts are
derived from the same rows, so they can never disagree with the files.

The tables, their upgrade and the shared connection: schema.py; the records: records.py.

Each line also counts its attempts (sends that did not end with a recorded result), committed
before the send: after a crash the lines that were in flight are known, and a line that keeps
killing the engine can be failed instead of being resumed forever (line_executor.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from steerserve.batch.records import (
    ACTIVE_STATUSES, TIMESTAMP_FIELDS, BatchRecord, FileInUse, FileRecord, InputLine, LineResult, PendingLine,
    new_file_id, now,
)
from steerserve.batch.schema import Database

_BATCH_COLUMNS = (
    "id, input_file_id, endpoint, completion_window, status, metadata, errors, output_file_id, "
    "error_file_id, total, server_id, " + ", ".join(TIMESTAMP_FIELDS)
)
_COUNTS = (
    "(SELECT count(*) FROM batch_results r WHERE r.batch_id = b.id AND r.ok = 1), "
    "(SELECT count(*) FROM batch_results r WHERE r.batch_id = b.id AND r.ok = 0)"
)


class Store(Database):
    """Files and batches: every read and every state change is one query or one transaction."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).resolve()
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.data_dir / "steerserve.sqlite3")

    # ------------------------------------------------------------------ files

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, record: FileRecord, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self._tx() as c:
            c.execute(
                f"{verb} INTO files (id, filename, purpose, bytes, created_at, status) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.filename, record.purpose, record.bytes, record.created_at, record.status),
            )

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._query(
            "SELECT id, filename, purpose, bytes, created_at, status FROM files WHERE id = ?", (file_id,)
        )
        return FileRecord(*rows[0]) if rows else None

    def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None when `after` names no file."""
        where, params = [], []
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            rows = self._query("SELECT seq FROM files WHERE id = ?", (after,))
            if not rows:
                return None
            where.append("seq < ?" if newest_first else "seq > ?")
            params.append(rows[0][0])
        sql = "SELECT id, filename, purpose, bytes, created_at, status FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self._query(sql, (*params, limit + 1))
        return [FileRecord(*r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        """False when there is no such file; FileInUse when an unfinished batch reads it.

        A finished batch's output or error file may go: the batch then stops pointing at it.
        One transaction, so a batch cannot be created on the file between check and delete.
        """
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        with self._tx() as c:
            if c.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone() is None:
                return False
            user = c.execute(
                f"SELECT id, status FROM batches WHERE status IN ({marks}) AND input_file_id = ? "
                "ORDER BY seq LIMIT 1",
                (*ACTIVE_STATUSES, file_id),
            ).fetchone()
            if user is not None:
                raise FileInUse(file_id, *user)
            c.execute("DELETE FROM files WHERE id = ?", (file_id,))
            c.execute("UPDATE batches SET output_file_id = NULL WHERE output_file_id = ?", (file_id,))
            c.execute("UPDATE batches SET error_file_id = NULL WHERE error_file_id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ batches

    def add_batch(self, batch: BatchRecord) -> bool:
        """False (nothing added) when the input file is gone: checked in the insert's own
        transaction, so a concurrent delete either sees this batch or this batch sees no file."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM files WHERE id = ?", (batch.input_file_id,)).fetchone() is None:
                return False
            c.execute(
                "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, metadata, "
                "created_at, expires_at, server_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.id, batch.input_file_id, batch.endpoint, batch.completion_window, batch.status,
                 json.dumps(batch.metadata) if batch.metadata is not None else None,
                 batch.created_at, batch.expires_at, batch.server_id),
            )
            return True

    @staticmethod
    def _batch(row: tuple) -> BatchRecord:
        (id_, input_file_id, endpoint, window, status, metadata, errors, output_file_id, error_file_id,
         total, server_id, *rest) = row
        stamps = dict(zip(TIMESTAMP_FIELDS, rest[: len(TIMESTAMP_FIELDS)], strict=True))
        completed, failed = rest[len(TIMESTAMP_FIELDS):]
        return BatchRecord(
            id=id_, input_file_id=input_file_id, endpoint=endpoint, completion_window=window,
            status=status, created_at=stamps["created_at"], expires_at=stamps["expires_at"],
            metadata=json.loads(metadata) if metadata else None,
            errors=json.loads(errors) if errors else None,
            output_file_id=output_file_id, error_file_id=error_file_id,
            total=total, server_id=server_id, completed=completed, failed=failed, timestamps=stamps,
        )

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        rows = self._query(f"SELECT {_BATCH_COLUMNS}, {_COUNTS} FROM batches b WHERE id = ?", (batch_id,))
        return self._batch(rows[0]) if rows else None

    def list_batches(self, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool] | None:
        """Newest first, like OpenAI; None when `after` names no batch."""
        params: list[Any] = []
        sql = f"SELECT {_BATCH_COLUMNS}, {_COUNTS} FROM batches b"
        if after is not None:
            rows = self._query("SELECT seq FROM batches WHERE id = ?", (after,))
            if not rows:
                return None
            sql += " WHERE seq < ?"
            params.append(rows[0][0])
        rows = self._query(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return [self._batch(r) for r in rows[:limit]], len(rows) > limit

    def active_batches(self) -> list[BatchRecord]:
        """Unfinished batches, oldest first (the order the runner serves them)."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        rows = self._query(
            f"SELECT {_BATCH_COLUMNS}, {_COUNTS} FROM batches b WHERE status IN ({marks}) ORDER BY seq",
            ACTIVE_STATUSES,
        )
        return [self._batch(r) for r in rows]

    def transition(self, batch_id: str, from_statuses: Iterable[str], to_status: str, **fields: Any) -> bool:
        """Compare-and-set of the status (plus timestamps etc.); False when it was not in `from_statuses`."""
        return self._transition(self._conn, batch_id, tuple(from_statuses), to_status, fields, locked=False)

    def _transition(self, conn, batch_id, from_statuses, to_status, fields, *, locked: bool) -> bool:
        sets = ["status = ?", *(f"{k} = ?" for k in fields)]
        values = [to_status, *(json.dumps(v) if k == "errors" else v for k, v in fields.items())]
        sql = (f"UPDATE batches SET {', '.join(sets)} WHERE id = ? "
               f"AND status IN ({','.join('?' * len(from_statuses))})")
        if locked:
            return conn.execute(sql, (*values, batch_id, *from_statuses)).rowcount > 0
        with self._tx() as c:
            return c.execute(sql, (*values, batch_id, *from_statuses)).rowcount > 0

    def save_validation(self, batch_id: str, lines: list[InputLine], early_results: list[LineResult]) -> bool:
        """Store the parsed lines and the results of lines rejected while parsing, and move
        validating -> in_progress, all in one transaction (a crash before it re-validates)."""
        with self._tx() as c:
            status = c.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if status is None or status[0] != "validating":  # cancelled meanwhile: keep nothing
                return False
            c.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
            c.execute("DELETE FROM batch_results WHERE batch_id = ?", (batch_id,))
            c.executemany(
                "INSERT INTO batch_lines (batch_id, line_index, custom_id, url, body) VALUES (?, ?, ?, ?, ?)",
                [(batch_id, line.index, line.custom_id, line.url, line.body) for line in lines],
            )
            stamp = now()
            c.executemany(
                "INSERT INTO batch_results (batch_id, line_index, ok, record, created_at) VALUES (?, ?, ?, ?, ?)",
                [(batch_id, r.index, int(r.ok), json.dumps(r.record), stamp) for r in early_results],
            )
            c.execute("UPDATE batches SET total = ? WHERE id = ?", (len(lines), batch_id))
            return self._transition(c, batch_id, ("validating",), "in_progress",
                                    {"in_progress_at": stamp}, locked=True)

    def pending_lines(self, batch_id: str) -> list[PendingLine]:
        rows = self._query(
            "SELECT l.line_index, l.attempts FROM batch_lines l LEFT JOIN batch_results r "
            "ON r.batch_id = l.batch_id AND r.line_index = l.line_index "
            "WHERE l.batch_id = ? AND r.line_index IS NULL ORDER BY l.line_index",
            (batch_id,),
        )
        return [PendingLine(*r) for r in rows]

    def begin_attempt(self, batch_id: str, index: int) -> None:
        """Count a send of the line, committed before it is sent so that it survives kill -9."""
        with self._tx() as c:
            c.execute("UPDATE batch_lines SET attempts = attempts + 1 WHERE batch_id = ? AND line_index = ?",
                      (batch_id, index))

    def refund_attempts(self, lines: Iterable[tuple[str, int]]) -> None:
        """Uncount sends cut short by a clean stop: they tell nothing about the line."""
        with self._tx() as c:
            c.executemany(
                "UPDATE batch_lines SET attempts = max(attempts - 1, 0) WHERE batch_id = ? AND line_index = ?",
                list(lines),
            )

    def get_line(self, batch_id: str, index: int) -> InputLine:
        rows = self._query(
            "SELECT line_index, custom_id, url, body FROM batch_lines WHERE batch_id = ? AND line_index = ?",
            (batch_id, index),
        )
        return InputLine(*rows[0])

    def record_results(self, batch_id: str, results: list[LineResult]) -> int:
        """Insert results of lines not yet done, only while the batch may still take them.

        Returns how many were inserted. The status check makes a late answer (after cancel
        was finalized, or after expiry) a no-op instead of a row the files do not contain.
        """
        with self._tx() as c:
            status = c.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if status is None or status[0] not in ("in_progress", "cancelling"):
                return 0
            stamp = now()
            inserted = 0
            for r in results:
                inserted += c.execute(
                    "INSERT OR IGNORE INTO batch_results (batch_id, line_index, ok, record, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (batch_id, r.index, int(r.ok), json.dumps(r.record), stamp),
                ).rowcount
            return inserted

    def iter_results(self, batch_id: str) -> Iterator[tuple[bool, str]]:
        """(ok, JSON line) in input order; read in pages so a huge batch is never all in memory."""
        last = -1
        while True:
            rows = self._query(
                "SELECT line_index, ok, record FROM batch_results WHERE batch_id = ? AND line_index > ? "
                "ORDER BY line_index LIMIT 1000",
                (batch_id, last),
            )
            if not rows:
                return
            for _index, ok, record in rows:
                yield bool(ok), record
            last = rows[-1][0]

    def result_file_ids(self, batch_id: str) -> tuple[str, str]:
        """(output, error) file ids of the batch: random, drawn at its first finalize and kept,
        so a finalize re-run after a crash writes the same files."""
        with self._tx() as c:
            row = c.execute("SELECT reserved_output_file_id, reserved_error_file_id FROM batches WHERE id = ?",
                            (batch_id,)).fetchone()
            if row[0] is not None:
                return row
            ids = new_file_id(), new_file_id()
            c.execute("UPDATE batches SET reserved_output_file_id = ?, reserved_error_file_id = ? WHERE id = ?",
                      (*ids, batch_id))
            return ids

    def finish(
        self, batch_id: str, from_statuses: Iterable[str], to_status: str,
        files: list[FileRecord], **fields: Any,
    ) -> bool:
        """Register the output/error files and set the final status in one transaction."""
        with self._tx() as c:
            status = c.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if status is None or status[0] not in tuple(from_statuses):
                return False
            for f in files:
                c.execute(
                    "INSERT OR REPLACE INTO files (id, filename, purpose, bytes, created_at, status) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (f.id, f.filename, f.purpose, f.bytes, f.created_at, f.status),
                )
            return self._transition(c, batch_id, tuple(from_statuses), to_status, fields, locked=True)
