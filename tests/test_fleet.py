"""A fleet: two steerserve servers on one real PostgreSQL (--database-url), driven as a load
balancer drives replicas (each request to either one). Presets and stored vectors made on one
steer on the other at once (no cache to go stale); a batch made on one runs on both engines, each
line exactly once; kill -9 of one mid-batch and the other finishes it; concurrent CRUD of one name
from both is never a 5xx. Both servers start together on a fresh database (their migrations race
and run once). The embedded SQLite data dir of the releases before --database-url: last test.

PostgreSQL is Debian's `postgresql` package (`make setup` installs it where it can); without its
initdb and pg_ctl the module skips, saying so. As root, the cluster runs as the `postgres` user.
"""

from __future__ import annotations

import base64
import concurrent.futures
import glob
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from steerserve.serve_process import ServeProcess, free_port
from tests.conftest import MODEL_NAME, PROMPT, serve_args, start_server

LEASE = 4  # --batch-lease-seconds of both servers: how soon the survivor takes a dead one's lines
TERMINAL = ("completed", "failed", "cancelled", "expired")


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class Postgres:
    """A PostgreSQL cluster of its own (trust auth on 127.0.0.1, a free port), which a test may
    stop and start again under the running fleet."""

    def __init__(self, bin_dir: Path, work: Path, prefix: list[str]):
        self.bin_dir, self.work, self.prefix = bin_dir, work, prefix
        self.port = free_port()
        self.url = f"postgresql://steer@127.0.0.1:{self.port}/fleet"
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(work / "data"), "-A", "trust", "-U", "steer",
                        "-E", "UTF8"], check=True, capture_output=True)

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.work / "data"), *args],
                       check=check, capture_output=True)

    def start(self) -> None:
        self._ctl("-l", str(self.work / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.work} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, check: bool = True) -> None:
        self._ctl("-m", "fast", "-w", "stop", check=check)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not found: install Debian's postgresql (`make setup` does, as root)")
    # Outside pytest's (private, 0700) temporary tree: the `postgres` user must reach it.
    work = Path(tempfile.mkdtemp(prefix="steerserve-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(work, user.pw_uid, user.pw_gid)
        os.chmod(work, 0o755)
        prefix = ["runuser", "-u", "postgres", "--"]
    cluster = Postgres(bin_dir, work, prefix)
    cluster.start()
    try:
        import psycopg

        with psycopg.connect(f"postgresql://steer@127.0.0.1:{cluster.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet")
        yield cluster
    finally:
        cluster.stop(check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, postgres, tmp_path_factory):
    """Two replicas on the fresh database, started together (each with its own data dir)."""
    work = tmp_path_factory.mktemp("fleet")

    def start(name: str) -> ServeProcess:
        return start_server(serve_args(tiny_model_dir, "--enforce-eager", "--data-dir", str(work / name),
                                       "--database-url", postgres.url, "--batch-lease-seconds", str(LEASE),
                                       "--batch-concurrency", "4"), work / f"{name}.log")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, name) for name in ("a", "b")]
        servers = []
        try:
            servers = [f.result() for f in futures]
            yield servers
        finally:
            for f in futures:
                if f.exception() is None:
                    f.result().stop()


def client(server: ServeProcess) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120)


def chat(http: httpx.Client, model: str, steering=None, max_tokens: int = 8) -> str:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def models(http: httpx.Client) -> set[str]:
    return {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_a_preset_and_a_vector_made_on_one_replica_steer_on_the_other_at_once(fleet, reference):
    a, b = (client(s) for s in fleet)
    direction = reference.sae(1).directions[3].float().numpy() * 8.0
    encoded = base64.b64encode(np.asarray(direction, dtype="<f4").tobytes()).decode()
    made = a.post("/v1/steering/vectors", json={"name": "fleet-d3", "vector": encoded})
    assert made.status_code == 200, made.text
    steer = {"vectors": [{"layer": 1, "vector": "fleet-d3", "mode": "add", "value": 1.0}],
             "features": [{"layer": 2, "index": 9, "mode": "add", "value": 6.0}]}
    made = a.post("/v1/steering/presets", json={"name": "fleet-preset", "steering": steer})
    assert made.status_code == 200, made.text
    assert "fleet-preset" in models(b)  # the first request after the creating one's answer sees it
    inline = {"vectors": [{"layer": 1, "vector": encoded, "mode": "add", "value": 1.0}],
              "features": [{"layer": 2, "index": 9, "mode": "add", "value": 6.0}]}
    expected = chat(a, MODEL_NAME, inline)
    assert expected != chat(a, MODEL_NAME)  # the steering changes the tokens
    assert chat(b, "fleet-preset") == expected == chat(b, MODEL_NAME, inline)
    assert chat(b, MODEL_NAME, {"vectors": inline["vectors"][:1]}) == chat(
        b, MODEL_NAME, {"vectors": steer["vectors"]})  # the stored vector by name, on B
    # deleted on B: gone from A's /v1/models and A's requests at once
    assert b.delete("/v1/steering/presets/fleet-preset").status_code == 200
    assert "fleet-preset" not in models(a)
    gone = a.post("/v1/chat/completions", json={"model": "fleet-preset", "messages": PROMPT, "max_tokens": 2})
    assert gone.status_code == 404, gone.text
    assert b.delete("/v1/steering/vectors/fleet-d3").status_code == 200
    gone = a.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 2,
                                                "steering": {"vectors": steer["vectors"]}})
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "vector_not_found"


def test_every_change_on_one_replica_is_in_the_others_models_list_at_the_first_request(fleet):
    """The consistency bound, measured: 10 creates and deletes, each alternately on A and B,
    each checked with ONE /v1/models on the other replica sent as soon as the change answered."""
    steer = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 2.0}]}
    lags = []
    for i in range(10):
        writer, reader = (client(fleet[0]), client(fleet[1]))[:: 1 if i % 2 == 0 else -1]
        assert writer.post("/v1/steering/presets", json={"name": f"bound-{i}", "steering": steer}).status_code == 200
        answered = time.monotonic()
        assert f"bound-{i}" in models(reader)
        lags.append(time.monotonic() - answered)
        assert writer.delete(f"/v1/steering/presets/bound-{i}").status_code == 200
        assert f"bound-{i}" not in models(reader)
    print(f"\nfleet: 10/10 presets in the other replica's /v1/models at its first request "
          f"(that request took at most {max(lags) * 1000:.1f} ms)")


def test_concurrent_crud_of_one_name_from_both_replicas_is_never_a_5xx(fleet):
    a, b = (client(s) for s in fleet)
    vector = base64.b64encode(np.ones(a.get("/v1/saes").json()["data"][0]["d_model"], "<f4").tobytes()).decode()
    steer = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 2.0}]}
    statuses: list[tuple[str, int]] = []
    lock = threading.Lock()

    def hammer(http: httpx.Client, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            op = rng.integers(5)
            if op == 0:
                r = http.post("/v1/steering/presets", json={"name": "race", "steering": steer})
            elif op == 1:
                r = http.get("/v1/steering/presets/race")
            elif op == 2:
                r = http.delete("/v1/steering/presets/race")
            elif op == 3:
                r = http.post("/v1/steering/vectors", json={"name": "race-v", "vector": vector})
            else:
                r = http.delete("/v1/steering/vectors/race-v")
            with lock:
                statuses.append((f"{r.request.method} {r.request.url.path}", r.status_code))
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert set(r.json()["error"]) >= {"message", "type", "code"}

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda args: hammer(*args), [(a, 1), (b, 2), (client(fleet[0]), 3), (client(fleet[1]), 4)]))
    assert {s for _, s in statuses} <= {200, 404, 409}, statuses
    assert any(s == 409 for _, s in statuses) and any(s == 200 for _, s in statuses)
    a.delete("/v1/steering/presets/race")
    a.delete("/v1/steering/vectors/race-v")


def batch_input(lines: int, max_tokens: int, prefix: str) -> bytes:
    rows = []
    for i in range(lines):
        body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        if i % 3 == 1:
            body["steering"] = {"features": [{"layer": 1, "index": i, "mode": "add", "value": 6.0}]}
        rows.append(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}))
    return ("\n".join(rows) + "\n").encode()


def submit(upload_to: httpx.Client, create_on: httpx.Client, data: bytes) -> dict:
    f = upload_to.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
    assert f.status_code == 200, f.text
    batch = create_on.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    return batch.json()


def wait(http: httpx.Client, batch_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in TERMINAL:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def results(http: httpx.Client, batch: dict) -> list[dict]:
    out = []
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            content = http.get(f"/v1/files/{batch[key]}/content")
            assert content.status_code == 200, content.text
            out += [json.loads(x) for x in content.text.splitlines()]
    return out


def engine_requests(server: ServeProcess) -> float:
    """Requests the server's engine finished (every finish reason)."""
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def test_a_batch_made_on_one_replica_runs_on_both_each_line_once(fleet):
    a, b = (client(s) for s in fleet)
    lines = 24
    before = [engine_requests(s) for s in fleet]
    started = time.monotonic()
    batch = submit(a, b, batch_input(lines, 48, "both"))  # the file uploaded to A, the batch created on B
    done = wait(a, batch["id"])
    took = time.monotonic() - started
    assert done["status"] == "completed" and done["request_counts"] == {"total": lines, "completed": lines,
                                                                         "failed": 0}
    taken = [engine_requests(s) - n for s, n in zip(fleet, before)]
    assert all(n >= 2 for n in taken) and sum(taken) == lines, taken  # both engines took lines, none twice
    out = results(b, done)
    assert sorted(r["custom_id"] for r in out) == sorted(f"both-{i}" for i in range(lines))
    assert a.get(f"/v1/files/{done['output_file_id']}/content").content == \
        b.get(f"/v1/files/{done['output_file_id']}/content").content
    print(f"\nfleet: {lines} lines on two replicas in {took:.1f} s ({lines / took:.2f} lines/s), engines took {taken}")


def kill_group(server: ServeProcess) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)


def leases(postgres, batch_id: str) -> dict[str, list[int]]:
    """Runner -> the lines of the batch it holds a lease on (and has not answered), from the database."""
    import psycopg

    with psycopg.connect(postgres.url) as conn:
        rows = conn.execute("SELECT lease_owner, line_index FROM batch_lines l WHERE batch_id = %s AND lease_owner "
                            "IS NOT NULL AND NOT EXISTS (SELECT 1 FROM batch_results r WHERE r.batch_id = l.batch_id "
                            "AND r.line_index = l.line_index) ORDER BY line_index", (batch_id,)).fetchall()
    held: dict[str, list[int]] = {}
    for owner, index in rows:
        held.setdefault(owner, []).append(index)
    return held


def attempts(postgres, batch_id: str, index: int) -> int:
    import psycopg

    with psycopg.connect(postgres.url) as conn:
        return conn.execute("SELECT attempts FROM batch_lines WHERE batch_id = %s AND line_index = %s",
                            (batch_id, index)).fetchone()[0]


def test_kill_9_of_one_replica_mid_batch_and_the_other_finishes_it(fleet, postgres):
    a, b = (client(s) for s in fleet)
    lines = 24
    batch = submit(b, a, batch_input(lines, 400, "kill"))
    deadline = time.monotonic() + 120
    while True:  # both are working on it (each holds leases), and some lines are done
        holders = leases(postgres, batch["id"])
        counts = a.get(f"/v1/batches/{batch['id']}").json()["request_counts"]
        if counts["completed"] >= 2 and len(holders) == 2:
            break
        assert time.monotonic() < deadline, (counts, holders)
        time.sleep(0.1)
    assert counts["completed"] < lines - 8, counts  # really mid-batch
    kill_group(fleet[0])
    a_held = leases(postgres, batch["id"])
    killed_at = time.monotonic()
    done = wait(b, batch["id"], timeout=240)
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": lines, "completed": lines, "failed": 0}
    out = results(b, done)
    assert sorted(r["custom_id"] for r in out) == sorted(f"kill-{i}" for i in range(lines))  # each line once
    a_lines = next(lines_ for owner, lines_ in a_held.items() if str(fleet[0].proc.pid) in owner.split(":"))
    assert a_lines and all(attempts(postgres, batch["id"], i) == 2 for i in a_lines)  # B ran A's lines again
    print(f"\nfleet: after kill -9 of A at {counts['completed']}/{lines} (A held lines {a_lines}), B finished in "
          f"{time.monotonic() - killed_at:.1f} s")

    # one replica left: the throughput of one, for comparison with the two above
    started = time.monotonic()
    single = wait(b, submit(b, b, batch_input(lines, 48, "one"))["id"])
    took = time.monotonic() - started
    assert single["request_counts"]["completed"] == lines
    print(f"fleet: {lines} lines on one replica in {took:.1f} s ({lines / took:.2f} lines/s)")


def test_while_postgresql_is_down_stored_state_is_a_503_and_the_rest_serves(fleet, postgres):
    """On the replica left: generation goes on, stored state answers 503 `database_unavailable`,
    a running batch waits (it is not failed) and completes once PostgreSQL is back."""
    b = client(fleet[1])
    assert b.post("/v1/steering/presets", json={"name": "outage", "steering": {
        "features": [{"layer": 1, "index": 3, "mode": "add", "value": 6.0}]}}).status_code == 200
    batch = submit(b, b, batch_input(8, 96, "outage"))
    time.sleep(1.0)
    postgres.stop()
    try:
        down_at = time.monotonic()
        assert chat(b, MODEL_NAME)  # plain and inline-steered generation need no database
        assert chat(b, MODEL_NAME, {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 6.0}]})
        assert {m for m in models(b)} == {MODEL_NAME}  # the served model still listed, presets not
        for response in (b.post("/v1/chat/completions", json={"model": "outage", "messages": PROMPT, "max_tokens": 2}),
                         b.get("/v1/steering/presets"), b.get(f"/v1/batches/{batch['id']}"),
                         b.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"})):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "database_unavailable"
        time.sleep(max(0.0, 12 - (time.monotonic() - down_at)))  # longer than 5 task failures' backoff
    finally:
        postgres.start()
    done = wait(b, batch["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 8, done
    assert sorted(r["custom_id"] for r in results(b, done)) == sorted(f"outage-{i}" for i in range(8))
    assert chat(b, "outage")  # the preset is served again
    b.delete("/v1/steering/presets/outage")


def test_a_runner_claims_only_lines_of_batches_of_the_model_it_serves(postgres, tmp_path):
    """Three runners on the fleet's database (the batch service in-process, with a fake engine):
    two serve model X, one model Y. A batch made through a Y server runs only on Y's engine, one
    made through an X server on both X engines (each line once), never on Y's."""
    import asyncio

    from tests.test_batch_units import FakeEngine, Harness, line

    async def body():
        def harness(name: str, model: str) -> Harness:
            return Harness(tmp_path / name, FakeEngine(), model=model, database_url=postgres.url,
                           batch_lease_seconds=LEASE)

        x1, x2, y = harness("x1", "models/x"), harness("x2", "models/x"), harness("y", "models/y")
        try:
            on_x = await x1.submit([line(f"x{i}", sleep=0.3) for i in range(20)])
            on_y = await y.submit([line(f"y{i}", sleep=0.05) for i in range(6)])
            done_x, done_y = await x2.wait(on_x["id"]), await x1.wait(on_y["id"])  # any server reads any batch
            assert done_x["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
            assert done_y["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
            x_calls = x1.engine.calls + x2.engine.calls
            assert x_calls == {f"x{i}": 1 for i in range(20)} and x1.engine.calls and x2.engine.calls
            assert y.engine.calls == {f"y{i}": 1 for i in range(6)}
            assert sorted(r["custom_id"] for r in await y.content(done_x["output_file_id"])) == \
                sorted(f"x{i}" for i in range(20))  # the output file, read through a Y server
        finally:
            for h in (x1, x2, y):
                await h.close()

    asyncio.run(body())


# ---------------------------------------------------------------------------- the embedded data dir

# The data dir exactly as the releases before --database-url created it (their CREATE TABLEs and
# the columns their hand-written upgrades added), with a row in each.
OLD_PRESETS = """CREATE TABLE IF NOT EXISTS presets (name TEXT PRIMARY KEY, steering TEXT NOT NULL, description TEXT,
    created_at INTEGER NOT NULL, source TEXT NOT NULL);"""
OLD_VECTORS = """CREATE TABLE IF NOT EXISTS vectors (name TEXT NOT NULL, layer INTEGER NOT NULL, data BLOB NOT NULL,
    description TEXT, created_at INTEGER NOT NULL, source TEXT NOT NULL, PRIMARY KEY (name, layer));"""
OLD_ADDED = ["ALTER TABLE batch_lines ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
             "ALTER TABLE batches ADD COLUMN reserved_output_file_id TEXT",
             "ALTER TABLE batches ADD COLUMN reserved_error_file_id TEXT",
             "ALTER TABLE batches ADD COLUMN server_id TEXT"]


def test_a_data_dir_of_the_sqlite_releases_opens_and_keeps_its_state(tmp_path):
    from steerserve.batch import schema
    from steerserve.batch.records import LineResult
    from steerserve.batch.store import Store
    from steerserve.steering.presets import PresetStore
    from steerserve.steering.vector_store import VectorStore

    with sqlite3.connect(tmp_path / "presets.sqlite") as db:
        db.executescript(OLD_PRESETS)
        db.execute("INSERT INTO presets VALUES ('old', ?, 'kept', 1, 'api')", (json.dumps({"features": []}),))
    with sqlite3.connect(tmp_path / "vectors.sqlite") as db:
        db.executescript(OLD_VECTORS)
        db.execute("INSERT INTO vectors VALUES ('v', -1, ?, NULL, 1, 'base64')", (np.ones(4, "<f4").tobytes(),))
    with sqlite3.connect(tmp_path / "steerserve.sqlite3") as db:
        db.executescript(schema.SCHEMA)
        for statement in OLD_ADDED:
            db.execute(statement)
        db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES ('file-1', 'in', 'batch', 3, 1)")
        db.execute("INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, created_at, total) "
                   "VALUES ('batch_1', 'file-1', '/v1/chat/completions', '24h', 'in_progress', 1, 2)")
        db.executemany("INSERT INTO batch_lines (batch_id, line_index, custom_id, url, body, attempts) "
                       "VALUES ('batch_1', ?, ?, '/v1/chat/completions', '{}', ?)", [(0, "a", 1), (1, "b", 0)])
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-1").write_bytes(b"{}\n")

    for _ in range(2):  # the second open finds everything at head and changes nothing
        presets, vectors, store = PresetStore(tmp_path), VectorStore(tmp_path, 4, 10), Store(tmp_path)
        try:
            assert presets.get("old").description == "kept"
            assert list(vectors.get("v").layers[None]) == [1.0] * 4
            assert store.get_file("file-1").bytes == 3 and store.contents.read_all("file-1") == b"{}\n"
            assert [tuple(p) for p in store.pending_lines("batch_1")] in ([(0, 1), (1, 0)], [(0, 1)])
        finally:
            presets.close(), vectors.close()
        claimed = store.claim_line("batch_1", "me", 30, (0, 1))
        if claimed is not None:  # first pass: the fresh line, leased to "me"; recorded once
            assert claimed == (1, 0)
            assert store.claim_line("batch_1", "other", 30, (0, 1)) is None  # leased
            result = LineResult(1, True, {"custom_id": "b"})
            assert store.record_results("batch_1", [result], owner="other") == 0  # not its lease
            assert store.record_results("batch_1", [result], owner="me") == 1
        store.close()
    with sqlite3.connect(tmp_path / "steerserve.sqlite3") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("batches_0002",)]
        assert db.execute("SELECT count(*) FROM batch_results").fetchone() == (1,)


@pytest.mark.parametrize("url", ["sqlite:///tmp/x.db", "mysql://u@h/db", "not a url", "mysql://u:s3cret@h/db",
                                 "postgresql://u:s3cret@h:notaport/db"])
def test_a_database_url_that_is_not_postgresql_stops_the_start_saying_why(url, tmp_path):
    from argparse import Namespace

    from steerserve.cli.serve import refuse_another_servers_data_dir

    with pytest.raises(SystemExit) as stopped:
        refuse_another_servers_data_dir(Namespace(database_url=url, data_dir=str(tmp_path)))
    assert "--database-url" in str(stopped.value) and "postgresql://" in str(stopped.value)
    assert "s3cret" not in str(stopped.value)  # the message goes to logs: never the password
