"""Where the bytes of files (batch inputs, outputs and errors) live: one small interface, two places.

- DirContents, the embedded default: DATA_DIR/files/<id>, written to a temporary name, fsynced and
  renamed into place, as every release has kept them (a data dir of an older release reads as is).
- DatabaseContents, with --database-url: rows of 1 MiB chunks in the shared PostgreSQL database
  (table file_contents), written in one transaction, so a file is complete or absent and every
  replica reads it. Why the database and not a shared directory or an object store: docs/fleet.md
  (one thing to run, back up and fail over; a file is committed with the same guarantees as the
  batch rows that name it; today's size limit, --max-upload-bytes, 200 MiB, fits it well).

Metadata (name, size, purpose) is in the `files` table either way (store.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import text

from steerserve.db import Database

CHUNK = 1 << 20


class DirContents:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def local_path(self, file_id: str) -> Path | None:
        """The file on this machine's disk, when it is there (served with sendfile)."""
        return self.directory / file_id

    def save(self, file_id: str, source: BinaryIO) -> int:
        path = self.directory / file_id
        tmp = f"{path}.upload"
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            os.replace(tmp, path)
        except BaseException:  # e.g. a full disk: leave no partial file behind
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def adopt(self, file_id: str, path: Path) -> None:
        """A complete, fsynced file written elsewhere on this disk becomes the file's contents."""
        os.replace(path, self.directory / file_id)

    def scratch(self, file_id: str) -> Path:
        """Where to write a file that `adopt` will take (same directory: the rename is atomic)."""
        return (self.directory / file_id).with_suffix(".tmp")

    def exists(self, file_id: str) -> bool:
        return (self.directory / file_id).is_file()

    def chunks(self, file_id: str) -> Iterator[bytes]:
        with open(self.directory / file_id, "rb") as f:
            while block := f.read(CHUNK):
                yield block

    def read_all(self, file_id: str) -> bytes | None:
        try:
            return (self.directory / file_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, file_id: str) -> None:
        (self.directory / file_id).unlink(missing_ok=True)


class DatabaseContents:
    def __init__(self, db: Database, scratch_dir: Path):
        self.db = db
        self.scratch_dir = scratch_dir  # this replica's own: finalize writes here, then saves
        scratch_dir.mkdir(parents=True, exist_ok=True)

    def local_path(self, file_id: str) -> Path | None:
        return None

    def save(self, file_id: str, source: BinaryIO) -> int:
        """All chunks in one transaction; writing the same id again (a finalize that ran on two
        replicas at once) overwrites it with the same bytes instead of failing."""
        size = 0
        with self.db.tx() as c:
            c.execute(text("DELETE FROM file_contents WHERE file_id = :f"), {"f": file_id})
            number = 0
            while block := source.read(CHUNK):
                c.execute(text("INSERT INTO file_contents (file_id, chunk, data) VALUES (:f, :n, :d) "
                               "ON CONFLICT (file_id, chunk) DO UPDATE SET data = excluded.data"),
                          {"f": file_id, "n": number, "d": block})
                number += 1
                size += len(block)
            if number == 0:  # an empty file: one empty chunk says it exists
                c.execute(text("INSERT INTO file_contents (file_id, chunk, data) VALUES (:f, 0, :d) "
                               "ON CONFLICT (file_id, chunk) DO NOTHING"), {"f": file_id, "d": b""})
        return size

    def adopt(self, file_id: str, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                self.save(file_id, f)
        finally:
            path.unlink(missing_ok=True)

    def scratch(self, file_id: str) -> Path:
        return self.scratch_dir / f"{file_id}.tmp"

    def exists(self, file_id: str) -> bool:
        return bool(self.db.read("SELECT 1 FROM file_contents WHERE file_id = :f AND chunk = 0", {"f": file_id}))

    def chunks(self, file_id: str) -> Iterator[bytes]:
        """One chunk per query, so a large file is never all in memory."""
        number = 0
        while True:
            rows = self.db.read("SELECT data FROM file_contents WHERE file_id = :f AND chunk = :n",
                                {"f": file_id, "n": number})
            if not rows:
                return
            yield bytes(rows[0][0])
            number += 1

    def read_all(self, file_id: str) -> bytes | None:
        if not self.exists(file_id):
            return None
        return b"".join(self.chunks(file_id))

    def delete(self, file_id: str) -> None:
        with self.db.tx() as c:
            c.execute(text("DELETE FROM file_contents WHERE file_id = :f"), {"f": file_id})
