"""The databases behind presets, stored vectors, batch files and batches.

Two places, one code path (SQLAlchemy 2, schema by Alembic migrations in db/migrations):
- embedded (the default): SQLite files in the data dir, one per part, as every release has laid
  them out (presets.sqlite, vectors.sqlite, steerserve.sqlite3); a data dir of an older release is
  brought up to date when opened;
- a fleet (`--database-url postgresql://...`): every part in one PostgreSQL database that every
  replica and every API process of every replica uses (docs/fleet.md).

Migrations run when a part is opened, once: under a PostgreSQL advisory lock (replicas starting
together wait for the first, then find the schema at head), or inside SQLite's write lock.

Write transactions (`Database.tx`): on SQLite a BEGIN IMMEDIATE (one writer at a time across
processes, as before); on PostgreSQL READ COMMITTED, and a part whose writes check a count or a
name before they write (presets, vectors: `serialize=True`) takes a transaction-level advisory
lock, the same one-writer rule. Batch transactions lock the batch's row instead (store.py), so
replicas working on different batches do not wait for each other.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from steerserve.errors import APIError

# The SQLite file of each part, as releases before --database-url laid out the data dir.
SQLITE_FILES = {"presets": "presets.sqlite", "vectors": "vectors.sqlite", "batches": "steerserve.sqlite3"}
MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x5EE75E12  # the PostgreSQL advisory lock held while migrations run

_engines: dict[str, Engine] = {}  # PostgreSQL: one pool per URL and process, shared by the parts
_engines_lock = threading.Lock()


UNAVAILABLE = "database_unavailable"  # the code of the 503 a request gets while PostgreSQL is unreachable


class DatabaseUrlError(ValueError):
    """A --database-url this server cannot use."""


def unavailable(exc: Exception) -> APIError:
    return APIError(f"the shared database is unavailable ({type(exc).__name__}); try again shortly",
                    code=UNAVAILABLE, status=503, type="server_error")


def is_shared(url: str | None) -> bool:
    """Whether a --database-url was given (only PostgreSQL's are taken: postgres_url); without
    one, the data dir's SQLite."""
    return url is not None


def postgres_url(url: str):
    """`postgresql://` or `postgres://` as SQLAlchemy's psycopg (3) URL."""
    try:
        parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    except Exception as exc:
        raise DatabaseUrlError(f"--database-url is not a database URL ({type(exc).__name__}); expected "
                               "postgresql://user:password@host:port/database") from None  # not echoed: it may hold a password
    if parsed.get_backend_name() != "postgresql":
        shown = parsed.render_as_string(hide_password=True)
        raise DatabaseUrlError(f"--database-url {shown!r}: expected postgresql://user:password@host:port/database "
                               "(leave it out for the embedded SQLite in --data-dir)")
    return parsed.set(drivername="postgresql+psycopg")


class Database:
    """One part's database: its engine, write transactions and reads."""

    def __init__(self, engine: Engine, part: str):
        self.engine, self.part = engine, part
        self.postgres = engine.dialect.name == "postgresql"
        self._own_engine = not self.postgres  # a PostgreSQL pool is shared by the parts

    # The database's clock in seconds (leases are compared with one clock, not each replica's).
    @property
    def now_sql(self) -> str:
        return "extract(epoch from clock_timestamp())" if self.postgres else "((julianday('now') - 2440587.5) * 86400.0)"

    def for_update(self, mode: str = "UPDATE") -> str:
        """A row lock clause: SQLite's write lock already holds the whole database."""
        return f" FOR {mode}" if self.postgres else ""

    @contextmanager
    def tx(self, serialize: bool = False) -> Iterator[Connection]:
        """One write transaction; `serialize`: one writer of this part at a time (see the module doc).
        PostgreSQL unreachable: a 503 `database_unavailable` (APIError), whatever step it failed at."""
        try:
            with self._tx(serialize) as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            if not self.postgres:
                raise
            raise unavailable(exc) from exc

    @contextmanager
    def _tx(self, serialize: bool) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if self.postgres:
                if serialize:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(self.part)})
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def read(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        try:
            with self.engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), params or {})]
        except (OperationalError, InterfaceError) as exc:
            if not self.postgres:
                raise
            raise unavailable(exc) from exc

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()


def _lock_key(part: str) -> int:
    return zlib.crc32(f"steerserve:{part}".encode())


def _sqlite_engine(path: Path, part: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def setup(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # transactions are begun explicitly (Database.tx)
        if part == "presets":
            dbapi_conn.execute("PRAGMA auto_vacuum=FULL")  # deleting presets shrinks the file
        dbapi_conn.execute("PRAGMA journal_mode=WAL")  # readers (other processes, a shell) see the state
        dbapi_conn.execute("PRAGMA synchronous=FULL")  # a committed line result survives power loss too

    return engine


def _postgres_engine(url: str) -> Engine:
    with _engines_lock:
        if url not in _engines:
            # pre_ping: a pooled connection that PostgreSQL dropped (a restart) is replaced, not used
            # connect_timeout: an unreachable host is a 503 within seconds, not a request hung on TCP
            _engines[url] = create_engine(postgres_url(url), pool_size=8, max_overflow=16, pool_pre_ping=True,
                                          pool_recycle=600, connect_args={"connect_timeout": 5})
        return _engines[url]


def open_database(part: str, data_dir: str | Path, url: str | None = None) -> Database:
    """The part's database, its schema migrated to the newest revision."""
    if is_shared(url):
        engine = _postgres_engine(url)
    else:
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        engine = _sqlite_engine(directory / SQLITE_FILES[part], part)
    db = Database(engine, part)
    try:
        migrate(db)
    except (OperationalError, InterfaceError) as exc:
        db.close()
        if not db.postgres:
            raise
        where = engine.url.render_as_string(hide_password=True)
        raise RuntimeError(f"steerserve: --database-url: cannot open {where} ({exc.orig or exc})") from None
    except BaseException:
        db.close()
        raise
    return db


def migrate(db: Database) -> None:
    """Upgrade the part's branch to its head, once even when several processes start together."""
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    target = f"{db.part}@head"

    def upgrade(revision, _context):
        return script._upgrade_revs(target, revision)

    with db.engine.connect() as conn:
        if db.postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            conn.commit()
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock: a second process waits here
        try:
            with EnvironmentContext(config, script, fn=upgrade, destination_rev=target) as env:
                env.configure(connection=conn, target_metadata=None, transactional_ddl=True)
                with env.begin_transaction():
                    env.run_migrations()
            conn.commit()
        finally:
            if db.postgres:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
                conn.commit()
            elif conn.in_transaction():
                conn.rollback()
