"""The records of the Files and Batches API as the store reads and writes them, and the
shape each has in the API's answers."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
TIMESTAMP_FIELDS = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
    "failed_at", "expired_at", "cancelling_at", "cancelled_at",
)


def now() -> int:
    return int(time.time())


def new_file_id() -> str:
    """Random, so nobody can derive a file's id (e.g. a batch's output file from its batch id)."""
    return "file-" + secrets.token_hex(12)


class FileInUse(Exception):
    """The file is the input of a batch that has not finished."""

    def __init__(self, file_id: str, batch_id: str, status: str):
        super().__init__(f"file {file_id} is the input of batch {batch_id} ({status})")
        self.batch_id, self.status = batch_id, status


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    status: str = "processed"

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": self.status,
            "expires_at": None, "status_details": None,
        }


@dataclass
class BatchRecord:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int | None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    server_id: str | None = None  # identity key of the server that accepted it (identity.py)
    completed: int = 0
    failed: int = 0
    timestamps: dict[str, int | None] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        stamps = {name: self.timestamps.get(name) for name in TIMESTAMP_FIELDS}
        stamps["created_at"], stamps["expires_at"] = self.created_at, self.expires_at
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, **stamps,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class InputLine:
    """One input line as validated: url/body are None for a line that already has its error."""

    index: int
    custom_id: str | None
    url: str | None
    body: str | None


class PendingLine(NamedTuple):
    index: int
    attempts: int  # > 0: it was in flight when the engine or the server died


@dataclass(frozen=True)
class LineResult:
    index: int
    ok: bool
    record: dict[str, Any]
