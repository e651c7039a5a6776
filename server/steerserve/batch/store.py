"""State of files and batches: the single source of truth the runners reconcile from.

Where it lives: steerserve/db (SQLite in the data dir, or the fleet's PostgreSQL with
--database-url); file contents: contents.py. Why a database: a batch must survive `kill -9`.
Each line's result is one row keyed by (batch_id, line_index), inserted in a transaction that
also checks the batch is still running, so a line is done exactly when its row exists: after a
crash the pending lines are just the lines without a row, and output files are rebuilt from rows
at finalize. Request counts are derived from the same rows, so they can never disagree with the
files.

Lines are claimed (claim_line): a runner takes a line with a lease (lease_owner, lease_until, on
the database's clock), renews it while the line runs, and records the line's result only while it
still holds the lease. Every runner of a fleet claims from the same rows (on PostgreSQL with
`FOR UPDATE SKIP LOCKED`), so a batch runs on every replica that serves its model; a runner that
dies (kill -9) stops renewing, and its lines are claimed again once their leases pass. A line
has at most one result row (its primary key), and a runner whose lease was taken over records
nothing, so no line completes twice.

Each line also counts its attempts (claims that did not end with a recorded result), committed
before the send: after a crash the lines that were in flight are known, and a line that keeps
killing the engine can be failed instead of being resumed forever (line_executor.py).

Transactions that change a batch lock its row first (SELECT ... FOR UPDATE on PostgreSQL; the
SQLite write lock holds everything): validation, recording results (FOR SHARE: several runners
record at once), finalize and transitions exclude each other per batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text

from steerserve.batch.contents import DatabaseContents, DirContents
from steerserve.batch.records import (
    ACTIVE_STATUSES, TIMESTAMP_FIELDS, BatchRecord, FileInUse, FileRecord, InputLine, LineResult, PendingLine,
    new_file_id, now,
)
from steerserve.db import Database, is_shared, open_database

_BATCH_COLUMNS = (
    "id, input_file_id, endpoint, completion_window, status, metadata, errors, output_file_id, "
    "error_file_id, total, server_id, " + ", ".join(TIMESTAMP_FIELDS)
)
_COUNTS = (
    "(SELECT count(*) FROM batch_results r WHERE r.batch_id = b.id AND r.ok = 1), "
    "(SELECT count(*) FROM batch_results r WHERE r.batch_id = b.id AND r.ok = 0)"
)
_ACTIVE = "status IN (" + ", ".join(f"'{status}'" for status in ACTIVE_STATUSES) + ")"
_NO_RESULT = ("NOT EXISTS (SELECT 1 FROM batch_results r WHERE r.batch_id = l.batch_id "
              "AND r.line_index = l.line_index)")


def _in(column: str, values: Iterable[Any]) -> tuple[str, dict[str, Any]]:
    """`column IN (:in_column_0, ...)` and its parameters."""
    params = {f"in_{column}_{i}": v for i, v in enumerate(values)}
    return f"{column} IN ({', '.join(':' + k for k in params) or 'NULL'})", params


class Store:
    """Files and batches: every read and every state change is one query or one transaction."""

    def __init__(self, data_dir: str | os.PathLike, database_url: str | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.shared = is_shared(database_url)
        self.db: Database = open_database("batches", self.data_dir, database_url)
        if self.shared:
            self.files_dir = None
            self.contents = DatabaseContents(self.db, self.data_dir / "scratch")
        else:
            self.files_dir = self.data_dir / "files"
            self.contents = DirContents(self.files_dir)

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> AbstractContextManager[Connection]:
        return self.db.tx()

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        return self.db.read(sql, params)

    def _lock_batch(self, c: Connection, batch_id: str, mode: str = "UPDATE") -> str | None:
        """The batch's status, its row locked for the rest of the transaction (None: no such batch)."""
        row = c.execute(text(f"SELECT status FROM batches WHERE id = :b{self.db.for_update(mode)}"),
                        {"b": batch_id}).first()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ files

    def add_file(self, record: FileRecord, replace: bool = False) -> None:
        conflict = (" ON CONFLICT (id) DO UPDATE SET filename = excluded.filename, purpose = excluded.purpose, "
                    "bytes = excluded.bytes, created_at = excluded.created_at, status = excluded.status"
                    if replace else "")
        with self._tx() as c:
            c.execute(text("INSERT INTO files (id, filename, purpose, bytes, created_at, status) "
                           f"VALUES (:id, :filename, :purpose, :bytes, :created_at, :status){conflict}"),
                      vars(record))

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._query(
            "SELECT id, filename, purpose, bytes, created_at, status FROM files WHERE id = :id", {"id": file_id})
        return FileRecord(*rows[0]) if rows else None

    def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None when `after` names no file."""
        where, params = [], {"limit": limit + 1}
        if purpose is not None:
            where.append("purpose = :purpose")
            params["purpose"] = purpose
        if after is not None:
            rows = self._query("SELECT seq FROM files WHERE id = :id", {"id": after})
            if not rows:
                return None
            where.append("seq < :seq" if newest_first else "seq > :seq")
            params["seq"] = rows[0][0]
        sql = "SELECT id, filename, purpose, bytes, created_at, status FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT :limit"
        rows = self._query(sql, params)
        return [FileRecord(*r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        """False when there is no such file; FileInUse when an unfinished batch reads it.

        A finished batch's output or error file may go: the batch then stops pointing at it.
        One transaction, the file's row locked, so a batch cannot be created on the file between
        check and delete.
        """
        with self._tx() as c:
            if c.execute(text(f"SELECT 1 FROM files WHERE id = :f{self.db.for_update()}"), {"f": file_id}).first() is None:
                return False
            user = c.execute(text(
                f"SELECT id, status FROM batches WHERE {_ACTIVE} AND input_file_id = :f ORDER BY seq LIMIT 1"),
                {"f": file_id}).first()
            if user is not None:
                raise FileInUse(file_id, *user)
            c.execute(text("DELETE FROM files WHERE id = :f"), {"f": file_id})
            c.execute(text("UPDATE batches SET output_file_id = NULL WHERE output_file_id = :f"), {"f": file_id})
            c.execute(text("UPDATE batches SET error_file_id = NULL WHERE error_file_id = :f"), {"f": file_id})
        self.contents.delete(file_id)
        return True

    # ------------------------------------------------------------------ batches

    def add_batch(self, batch: BatchRecord) -> bool:
        """False (nothing added) when the input file is gone: checked in the insert's own
        transaction (the file's row locked), so a concurrent delete either sees this batch or
        this batch sees no file."""
        with self._tx() as c:
            found = c.execute(text(f"SELECT 1 FROM files WHERE id = :f{self.db.for_update('SHARE')}"),
                              {"f": batch.input_file_id}).first()
            if found is None:
                return False
            c.execute(text(
                "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, metadata, "
                "created_at, expires_at, server_id) VALUES (:id, :input_file_id, :endpoint, :completion_window, "
                ":status, :metadata, :created_at, :expires_at, :server_id)"),
                {"id": batch.id, "input_file_id": batch.input_file_id, "endpoint": batch.endpoint,
                 "completion_window": batch.completion_window, "status": batch.status,
                 "metadata": json.dumps(batch.metadata) if batch.metadata is not None else None,
                 "created_at": batch.created_at, "expires_at": batch.expires_at, "server_id": batch.server_id})
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
        rows = self._query(f"SELECT {_BATCH_COLUMNS}, {_COUNTS} FROM batches b WHERE id = :b", {"b": batch_id})
        return self._batch(rows[0]) if rows else None

    def list_batches(self, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool] | None:
        """Newest first, like OpenAI; None when `after` names no batch."""
        params: dict[str, Any] = {"limit": limit + 1}
        sql = f"SELECT {_BATCH_COLUMNS}, {_COUNTS} FROM batches b"
        if after is not None:
            rows = self._query("SELECT seq FROM batches WHERE id = :b", {"b": after})
            if not rows:
                return None
            sql += " WHERE seq < :seq"
            params["seq"] = rows[0][0]
        rows = self._query(sql + " ORDER BY seq DESC LIMIT :limit", params)
        return [self._batch(r) for r in rows[:limit]], len(rows) > limit

    def active_batches(self) -> list[BatchRecord]:
        """Unfinished batches, oldest first (the order the runner serves them)."""
        rows = self._query(f"SELECT {_BATCH_COLUMNS}, {_COUNTS} FROM batches b WHERE {_ACTIVE} ORDER BY seq")
        return [self._batch(r) for r in rows]

    def transition(self, batch_id: str, from_statuses: Iterable[str], to_status: str, **fields: Any) -> bool:
        """Compare-and-set of the status (plus timestamps etc.); False when it was not in `from_statuses`."""
        with self._tx() as c:
            return self._transition(c, batch_id, tuple(from_statuses), to_status, fields)

    @staticmethod
    def _transition(c: Connection, batch_id, from_statuses, to_status, fields) -> bool:
        sets = ["status = :to_status", *(f"{k} = :set_{k}" for k in fields)]
        params = {"to_status": to_status, "b": batch_id,
                  **{f"set_{k}": json.dumps(v) if k == "errors" else v for k, v in fields.items()}}
        where, more = _in("status", from_statuses)
        sql = f"UPDATE batches SET {', '.join(sets)} WHERE id = :b AND {where}"
        return c.execute(text(sql), {**params, **more}).rowcount > 0

    def save_validation(self, batch_id: str, lines: list[InputLine], early_results: list[LineResult]) -> bool:
        """Store the parsed lines and the results of lines rejected while parsing, and move
        validating -> in_progress, all in one transaction (a crash before it re-validates)."""
        with self._tx() as c:
            if self._lock_batch(c, batch_id) != "validating":  # cancelled meanwhile (or another runner did it)
                return False
            c.execute(text("DELETE FROM batch_lines WHERE batch_id = :b"), {"b": batch_id})
            c.execute(text("DELETE FROM batch_results WHERE batch_id = :b"), {"b": batch_id})
            if lines:
                c.execute(text("INSERT INTO batch_lines (batch_id, line_index, custom_id, url, body) "
                               "VALUES (:b, :i, :custom_id, :url, :body)"),
                          [{"b": batch_id, "i": line.index, "custom_id": line.custom_id, "url": line.url,
                            "body": line.body} for line in lines])
            stamp = now()
            if early_results:
                c.execute(text("INSERT INTO batch_results (batch_id, line_index, ok, record, created_at) "
                               "VALUES (:b, :i, :ok, :record, :t)"),
                          [{"b": batch_id, "i": r.index, "ok": int(r.ok), "record": json.dumps(r.record), "t": stamp}
                           for r in early_results])
            c.execute(text("UPDATE batches SET total = :n WHERE id = :b"), {"n": len(lines), "b": batch_id})
            return self._transition(c, batch_id, ("validating",), "in_progress", {"in_progress_at": stamp})

    def pending_lines(self, batch_id: str) -> list[PendingLine]:
        """Lines without a result (leased by a runner or not)."""
        rows = self._query(
            f"SELECT l.line_index, l.attempts FROM batch_lines l WHERE l.batch_id = :b AND {_NO_RESULT} "
            "ORDER BY l.line_index", {"b": batch_id})
        return [PendingLine(*r) for r in rows]

    def claim_line(self, batch_id: str, owner: str, lease_seconds: float, attempts: tuple[int, int]
                   ) -> PendingLine | None:
        """Lease the first line without a result and without a live lease whose attempts so far are
        in [attempts[0], attempts[1]), counting this attempt (committed before the line is sent,
        so it survives kill -9). Returns the line with its attempts before this one, or None."""
        now_sql = self.db.now_sql
        while True:
            with self._tx() as c:
                if self._lock_batch(c, batch_id, "SHARE") not in ("in_progress",):
                    return None
                row = c.execute(text(
                    f"UPDATE batch_lines SET lease_owner = :owner, lease_until = {now_sql} + :lease, "
                    "attempts = attempts + 1 WHERE batch_id = :b AND line_index = ("
                    f"SELECT l.line_index FROM batch_lines l WHERE l.batch_id = :b AND l.attempts >= :lo "
                    f"AND l.attempts < :hi AND (l.lease_until IS NULL OR l.lease_until < {now_sql}) AND {_NO_RESULT} "
                    f"ORDER BY l.line_index LIMIT 1{self.db.for_update('UPDATE SKIP LOCKED')}) "
                    "RETURNING line_index, attempts"),
                    {"owner": owner, "lease": lease_seconds, "b": batch_id, "lo": attempts[0], "hi": attempts[1]}
                ).first()
                if row is None:
                    return None
                # A result committed by the line's previous holder after this statement's snapshot
                # (PostgreSQL, READ COMMITTED): this statement sees it; leave the line alone.
                done = c.execute(text("SELECT 1 FROM batch_results WHERE batch_id = :b AND line_index = :i"),
                                 {"b": batch_id, "i": row[0]}).first()
                if done is None:
                    return PendingLine(row[0], row[1] - 1)
                c.rollback()

    def renew_leases(self, owner: str, lines: Iterable[tuple[str, int]], lease_seconds: float) -> None:
        """Extend the leases `owner` holds on `lines` (those its runner is working on now; a lease
        it holds on a line whose answer it lost, e.g. to a database outage, is left to pass)."""
        lines = list(lines)
        if not lines:
            return
        with self._tx() as c:
            c.execute(text(f"UPDATE batch_lines SET lease_until = {self.db.now_sql} + :lease "
                           "WHERE lease_owner = :owner AND batch_id = :b AND line_index = :i"),
                      [{"owner": owner, "lease": lease_seconds, "b": b, "i": i} for b, i in lines])

    def drop_leases(self) -> None:
        """Forget every lease (their attempts stay counted): for the one runner of an embedded data
        dir, at its start, whatever leases are there are its dead predecessor's."""
        with self._tx() as c:
            c.execute(text("UPDATE batch_lines SET lease_owner = NULL, lease_until = NULL "
                           "WHERE lease_owner IS NOT NULL"))

    def begin_attempt(self, batch_id: str, index: int) -> None:
        """Count a send of the line (without a lease: claim_line does both for the runner)."""
        with self._tx() as c:
            c.execute(text("UPDATE batch_lines SET attempts = attempts + 1 WHERE batch_id = :b AND line_index = :i"),
                      {"b": batch_id, "i": index})

    def refund_attempts(self, lines: Iterable[tuple[str, int]]) -> None:
        """Uncount sends cut short by a clean stop (they tell nothing about the line) and give
        their leases back, so another runner takes them at once."""
        lines = list(lines)
        if not lines:
            return
        with self._tx() as c:
            c.execute(text("UPDATE batch_lines SET attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, "
                           "lease_owner = NULL, lease_until = NULL WHERE batch_id = :b AND line_index = :i"),
                      [{"b": b, "i": i} for b, i in lines])

    def get_line(self, batch_id: str, index: int) -> InputLine:
        rows = self._query(
            "SELECT line_index, custom_id, url, body FROM batch_lines WHERE batch_id = :b AND line_index = :i",
            {"b": batch_id, "i": index})
        return InputLine(*rows[0])

    def record_results(self, batch_id: str, results: list[LineResult], owner: str | None = None) -> int:
        """Insert results of lines not yet done, only while the batch may still take them and,
        with `owner`, only for lines whose lease `owner` still holds.

        Returns how many were inserted. The status check makes a late answer (after cancel
        was finalized, or after expiry) a no-op instead of a row the files do not contain; the
        lease check makes the answer of a runner whose lease passed (and was taken over) one.
        """
        with self._tx() as c:
            if self._lock_batch(c, batch_id, "SHARE") not in ("in_progress", "cancelling"):
                return 0
            stamp = now()
            inserted = 0
            for r in results:
                if owner is not None:
                    holder = c.execute(text(
                        "SELECT lease_owner FROM batch_lines WHERE batch_id = :b AND line_index = :i"
                        f"{self.db.for_update()}"), {"b": batch_id, "i": r.index}).first()
                    if holder is None or holder[0] != owner:
                        continue
                inserted += c.execute(text(
                    "INSERT INTO batch_results (batch_id, line_index, ok, record, created_at) "
                    "VALUES (:b, :i, :ok, :record, :t) ON CONFLICT (batch_id, line_index) DO NOTHING"),
                    {"b": batch_id, "i": r.index, "ok": int(r.ok), "record": json.dumps(r.record), "t": stamp}
                ).rowcount
                if owner is not None:
                    c.execute(text("UPDATE batch_lines SET lease_owner = NULL, lease_until = NULL "
                                   "WHERE batch_id = :b AND line_index = :i"), {"b": batch_id, "i": r.index})
            return inserted

    def iter_results(self, batch_id: str) -> Iterator[tuple[bool, str]]:
        """(ok, JSON line) in input order; read in pages so a huge batch is never all in memory."""
        last = -1
        while True:
            rows = self._query(
                "SELECT line_index, ok, record FROM batch_results WHERE batch_id = :b AND line_index > :last "
                "ORDER BY line_index LIMIT 1000", {"b": batch_id, "last": last})
            if not rows:
                return
            for _index, ok, record in rows:
                yield bool(ok), record
            last = rows[-1][0]

    def result_file_ids(self, batch_id: str) -> tuple[str, str]:
        """(output, error) file ids of the batch: random, drawn at its first finalize and kept,
        so a finalize re-run after a crash (or on another replica) writes the same files."""
        with self._tx() as c:
            self._lock_batch(c, batch_id)
            row = c.execute(text("SELECT reserved_output_file_id, reserved_error_file_id FROM batches WHERE id = :b"),
                            {"b": batch_id}).first()
            if row[0] is not None:
                return tuple(row)
            ids = new_file_id(), new_file_id()
            c.execute(text("UPDATE batches SET reserved_output_file_id = :o, reserved_error_file_id = :e WHERE id = :b"),
                      {"o": ids[0], "e": ids[1], "b": batch_id})
            return ids

    def finish(
        self, batch_id: str, from_statuses: Iterable[str], to_status: str,
        files: list[FileRecord], **fields: Any,
    ) -> bool:
        """Register the output/error files and set the final status in one transaction."""
        with self._tx() as c:
            if self._lock_batch(c, batch_id) not in tuple(from_statuses):
                return False
            for f in files:
                c.execute(text(
                    "INSERT INTO files (id, filename, purpose, bytes, created_at, status) "
                    "VALUES (:id, :filename, :purpose, :bytes, :created_at, :status) ON CONFLICT (id) DO UPDATE SET "
                    "filename = excluded.filename, purpose = excluded.purpose, bytes = excluded.bytes, "
                    "created_at = excluded.created_at, status = excluded.status"), vars(f))
            return self._transition(c, batch_id, tuple(from_statuses), to_status, fields)
