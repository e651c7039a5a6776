"""The batch database's tables as the first release created them, kept for the upgrade tests
(an old data dir is built from it and must open). The schema itself, and its upgrades from every
older release, are Alembic migrations (steerserve/db/migrations, branch `batches`); the engine,
transactions and the choice of SQLite or PostgreSQL: steerserve/db.
"""

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
