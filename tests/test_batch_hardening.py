"""The Files + Batches API under hostile or unlucky input: no request and no batch line can take
the server down or loop it (poison pills, malformed bodies, oversized uploads and batches,
guessed file ids, files deleted under a batch). Same fake completions app as
test_batch_units.py: no vLLM, seconds per test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import time

import pytest

from steerserve.batch import line_executor, runner, schema
from steerserve.batch.lines import more_lines_than, parse_input_file
from steerserve.batch.records import BatchRecord, FileInUse, FileRecord, now
from steerserve.batch.store import Store
from tests.test_batch_units import CHAT, FakeEngine, Harness, jsonl, line, run

TERMINAL = ("completed", "failed", "cancelled", "expired")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")


def openai_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------------- poison pills


def test_poison_line_fails_after_max_attempts_and_lines_sharing_its_crash_complete(tmp_path):
    """Each life of the server ends like kill -9 once the engine dies (no clean stop)."""
    lines = [line("a", wait=True), line("p", kill=True), line("b", wait=True), line("c", wait=True),
             *(line(f"f{i}") for i in range(4))]

    async def life(batch_id: str | None):
        engine = FakeEngine()
        if batch_id is not None:
            engine.release.set()  # only the first life has lines waiting for the crash
        h = Harness(tmp_path, engine, concurrency=4)
        try:
            if batch_id is None:
                batch_id = (await h.submit(lines))["id"]
            for _ in range(400):
                batch = await h.get(batch_id)
                if engine.errored or batch["status"] in TERMINAL:
                    break
                await asyncio.sleep(0.05)
            if engine.errored:
                await asyncio.sleep(0.2)  # the lines waiting answer, to a dead engine: not recorded
                attempts = {i: n for i, n in h.service.store.pending_lines(batch_id)}
                return batch_id, engine, attempts, None
            files = [await h.content(batch[k]) for k in ("output_file_id", "error_file_id")]
            return batch_id, engine, None, (batch, *files)
        finally:
            await h.close()

    batch_id, lives, attempts_seen, end = None, [], [], None
    while end is None:
        assert len(lives) < 6, "the server keeps resuming into the crash"
        batch_id, engine, attempts, end = run(life(batch_id))
        lives.append(engine)
        attempts_seen.append(attempts)

    assert len(lives) == line_executor.MAX_LINE_ATTEMPTS + 1
    assert sum(e.calls["p"] for e in lives) == line_executor.MAX_LINE_ATTEMPTS  # then never sent again
    assert attempts_seen[0] == {0: 1, 1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0}  # committed before the send
    assert lives[1].company == {"a": [0], "p": [0]}  # after a crash, its suspects run alone
    assert lives[2].company == {"p": [0]}
    assert lives[3].calls["p"] == 0 and lives[3].company["b"] == lives[3].company["c"] == [0]
    batch, out, err = end
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 8, "completed": 7, "failed": 1}
    assert [o["custom_id"] for o in out] == ["a", "b", "c", "f0", "f1", "f2", "f3"]
    (poison,) = err
    assert poison["custom_id"] == "p" and poison["response"]["status_code"] == 500
    error = poison["response"]["body"]["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_failure" and error["param"] is None
    assert f"failed {line_executor.MAX_LINE_ATTEMPTS} times while running this line" in error["message"]


def test_database_of_an_older_release_opens_and_gains_the_new_columns(tmp_path):
    conn = sqlite3.connect(tmp_path / "steerserve.sqlite3")
    conn.executescript(schema.SCHEMA)  # the tables as the first release created them
    conn.execute("INSERT INTO batch_lines (batch_id, line_index, custom_id, url, body) VALUES ('b', 0, 'a', ?, '{}')",
                 (CHAT,))
    conn.commit()
    conn.close()
    store = Store(tmp_path)
    try:
        assert store.pending_lines("b") == [(0, 0)]
        store.begin_attempt("b", 0)
        assert store.pending_lines("b") == [(0, 1)]
    finally:
        store.close()
    Store(tmp_path).close()  # opening it again adds nothing twice


# ---------------------------------------------------------------------------- file ids


def test_result_file_ids_are_random_and_kept_when_finalize_runs_again(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine())
        try:
            batch = await h.wait((await h.submit([line("a"), line("b", status=400)]))["id"])
            assert re.fullmatch(r"batch_[0-9a-f]{24}", batch["id"]) and FILE_ID.fullmatch(batch["input_file_id"])
            ids = batch["output_file_id"], batch["error_file_id"]
            for kind, file_id in zip(("output", "error"), ids, strict=True):
                assert FILE_ID.fullmatch(file_id)
                assert file_id[5:] != hashlib.sha256(f"{batch['id']}:{kind}".encode()).hexdigest()[:24]
            with h.service.store._tx() as c:  # a crash after the files were written, before the status
                c.exec_driver_sql("UPDATE batches SET status = 'finalizing', output_file_id = NULL, "
                                  "error_file_id = NULL WHERE id = ?", (batch["id"],))
            h.service.wake()
            again = await h.wait(batch["id"])
            assert (again["output_file_id"], again["error_file_id"]) == ids
            assert sorted(p.name for p in h.service.store.files_dir.iterdir()) == sorted(
                [batch["input_file_id"], *ids])
            assert [o["custom_id"] for o in await h.content(ids[0])] == ["a"]
        finally:
            await h.close()

    run(body())


# ---------------------------------------------------------------------------- deleting files


def test_input_of_an_unfinished_batch_cannot_be_deleted_and_finished_results_can(tmp_path):
    async def body():
        engine = FakeEngine()
        h = Harness(tmp_path, engine)
        try:
            batch = await h.submit([line("a", wait=True), line("b", status=400)])
            for _ in range(200):
                if engine.calls["a"]:
                    break
                await asyncio.sleep(0.05)
            error = openai_error(await h.http.delete(f"/v1/files/{batch['input_file_id']}"), 409, "file_in_use")
            assert error["param"] == "file_id" and batch["id"] in error["message"]
            engine.release.set()
            batch = await h.wait(batch["id"])
            output, errors = batch["output_file_id"], batch["error_file_id"]
            assert (await h.http.delete(f"/v1/files/{output}")).json()["deleted"]
            batch = await h.get(batch["id"])
            assert batch["output_file_id"] is None and batch["error_file_id"] == errors
            assert (await h.http.delete(f"/v1/files/{errors}")).status_code == 200
            assert (await h.http.delete(f"/v1/files/{batch['input_file_id']}")).status_code == 200
            batch = await h.get(batch["id"])
            assert batch["output_file_id"] is None and batch["error_file_id"] is None
            assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
            openai_error(await h.http.get(f"/v1/files/{output}/content"), 404, "not_found")
        finally:
            engine.release.set()
            await h.close()

    run(body())


def test_store_delete_and_batch_creation_exclude_each_other(tmp_path):
    store = Store(tmp_path)
    try:
        for file_id in ("file-in", "file-gone"):
            store.add_file(FileRecord(file_id, "in.jsonl", "batch", 1, now()))
        batch = BatchRecord(id="batch_1", input_file_id="file-in", endpoint=CHAT, completion_window="24h",
                            status="validating", created_at=now(), expires_at=now() + 3600)
        assert store.add_batch(batch)
        with pytest.raises(FileInUse) as busy:
            store.delete_file("file-in")
        assert (busy.value.batch_id, busy.value.status) == ("batch_1", "validating")
        assert store.get_file("file-in") is not None
        assert store.delete_file("file-gone") and not store.delete_file("file-gone")
        late = BatchRecord(**{**batch.__dict__, "id": "batch_2", "input_file_id": "file-gone"})
        assert not store.add_batch(late) and store.get_batch("batch_2") is None
    finally:
        store.close()


def test_batch_created_while_its_file_is_deleted_gets_404(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine())
        store = h.service.store
        try:
            file = (await h.http.post("/v1/files", files={"file": ("in.jsonl", jsonl([line("a")]))},
                                      data={"purpose": "batch"})).json()
            real_get_file = store.get_file

            def deleted_right_after_the_check(file_id):
                record = real_get_file(file_id)
                store.delete_file(file_id)
                return record

            store.get_file = deleted_right_after_the_check
            r = await h.http.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": CHAT,
                                                       "completion_window": "24h"})
            assert openai_error(r, 404, "not_found")["param"] == "input_file_id"
            assert (await h.http.get("/v1/batches")).json()["data"] == []
        finally:
            await h.close()

    run(body())


# ---------------------------------------------------------------------------- limits


def multipart(content: bytes, boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


class Chunks:
    """A request body sent in small chunks, counting how many the server pulled."""

    def __init__(self, data: bytes, size: int = 100):
        self.parts = [data[i:i + size] for i in range(0, len(data), size)]
        self.pulled = 0

    async def __aiter__(self):
        for part in self.parts:
            self.pulled += 1
            yield part


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_upload_over_the_limit_gets_413_and_leaves_nothing(tmp_path, declared):
    async def body():
        h = Harness(tmp_path, FakeEngine(), max_upload_bytes=1000)
        try:
            fits, headers = multipart(b"x" * 700)
            ok = await h.http.post("/v1/files", content=fits, headers=headers)
            assert ok.status_code == 200 and ok.json()["bytes"] == 700
            data, headers = multipart(b"x" * 5000)
            chunks = Chunks(data)
            if declared:
                headers["content-length"] = str(len(data))
            r = await h.http.post("/v1/files", content=chunks, headers=headers)
            assert openai_error(r, 413, "file_too_large")["param"] == "file"
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert chunks.pulled == (0 if declared else 11)  # read no further than the limit
            assert [p.name for p in h.service.store.files_dir.iterdir()] == [ok.json()["id"]]
            assert [f["id"] for f in (await h.http.get("/v1/files")).json()["data"]] == [ok.json()["id"]]
        finally:
            await h.close()

    run(body())


def test_batch_over_the_line_limit_fails_validation(tmp_path):
    async def body():
        engine = FakeEngine()
        h = Harness(tmp_path, engine, max_batch_lines=3)
        try:
            batch = await h.wait((await h.submit([line(f"r{i}") for i in range(4)]))["id"])
            assert batch["status"] == "failed" and engine.calls == {}
            (error,) = batch["errors"]["data"]
            assert error["code"] == "too_many_lines" and "3" in error["message"]
            assert error["param"] is None and error["line"] is None
            ok = await h.wait((await h.submit(["", line("a"), "  ", line("b"), "\t\r", line("c"), ""]))["id"])
            assert ok["status"] == "completed" and ok["request_counts"]["total"] == 3
        finally:
            await h.close()

    run(body())


@pytest.mark.parametrize("data, limit, over", [
    (b"", 0, False), (b"a", 0, True), (b"a\nb\nc", 2, True), (b"a\nb\n", 2, False),
    (b"a\n\n \r\n\t\nb\n", 2, False), (b"\n" * 100, 1, False), (b"a\n" * 100_000, 50_000, True),
])
def test_line_counter_counts_requests_not_newlines(data, limit, over):
    assert more_lines_than(data, limit) is over


def test_a_line_ends_only_at_a_newline(tmp_path):
    path = tmp_path / "in.jsonl"
    text = json.dumps(line("a", note="one\u2028line\x85still"), ensure_ascii=False) + "\r\n"
    path.write_bytes((text + json.dumps(line("b"))).encode())
    parsed = parse_input_file(path, "batch_x", CHAT, max_lines=2)
    assert parsed.errors == [] and parsed.early_results == []
    assert [x.custom_id for x in parsed.lines] == ["a", "b"]
    assert json.loads(parsed.lines[0].body)["note"] == "one\u2028line\x85still"


# ---------------------------------------------------------------------------- malformed requests


def form(*fields: tuple[str, str, str | None]) -> tuple[bytes, dict[str, str]]:
    """(name, value, filename or None) fields as a multipart body."""
    body = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--B\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n".encode()
    return body + b"--B--\r\n", {"content-type": "multipart/form-data; boundary=B"}


DEEP = "[" * 10_000 + "]" * 10_000
CREATE = {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"}
MALFORMED = {
    "deep array": ("POST", "/v1/batches", {"content": DEEP}, 400, "invalid_json"),
    "deep object": ("POST", "/v1/batches", {"content": '{"a":' * 10_000 + "1" + "}" * 10_000}, 400, "invalid_json"),
    "deep metadata": ("POST", "/v1/batches", {"content": json.dumps(CREATE)[:-1] + ', "metadata": ' + DEEP + "}"},
                      400, "invalid_json"),
    "latin-1": ("POST", "/v1/batches", {"content": '{"input_file_id": "caf\xe9"}'.encode("latin-1")}, 400,
                "invalid_json"),
    "utf-16": ("POST", "/v1/batches", {"content": json.dumps(CREATE).encode("utf-16")}, 400, "invalid_json"),
    "empty": ("POST", "/v1/batches", {"content": b""}, 400, "invalid_json"),
    "list": ("POST", "/v1/batches", {"json": [CREATE]}, 400, None),
    "huge window": ("POST", "/v1/batches", {"json": {**CREATE, "completion_window": "9" * 5000 + "h"}}, 400,
                    "invalid_completion_window"),
    "metadata not strings": ("POST", "/v1/batches", {"json": {**CREATE, "metadata": {"k": {"v": 1}}}}, 400, None),
    "huge limit": ("GET", "/v1/batches?limit=" + "9" * 30, {}, 400, "invalid_limit"),
    "5000-digit limit": ("GET", "/v1/batches?limit=" + "9" * 5000, {}, 400, "invalid_limit"),
    "float limit": ("GET", "/v1/batches?limit=1e3", {}, 400, "invalid_limit"),
    "empty limit": ("GET", "/v1/batches?limit=", {}, 400, "invalid_limit"),
    "negative limit": ("GET", "/v1/files?limit=-1", {}, 400, "invalid_limit"),
    "huge files limit": ("GET", "/v1/files?limit=" + "9" * 5000, {}, 400, "invalid_limit"),
    "long after": ("GET", "/v1/batches?after=" + "x" * 10_000, {}, 404, "not_found"),
    "nul after": ("GET", "/v1/batches?after=%00", {}, 404, "not_found"),
    "quote after": ("GET", "/v1/files?after=%27%3B--&order=asc", {}, 404, "not_found"),
    "bad order": ("GET", "/v1/files?order=%FF", {}, 400, "invalid_order"),
    "nul file": ("GET", "/v1/files/file-%00", {}, 404, "not_found"),
    "nul content": ("GET", "/v1/files/%00/content", {}, 404, "not_found"),
    "dots content": ("GET", "/v1/files/%2E%2E/content", {}, 404, "not_found"),
    "nul delete": ("DELETE", "/v1/files/%00", {}, 404, "not_found"),
    "odd batch": ("GET", "/v1/batches/%FF%FE", {}, 404, "not_found"),
    "odd cancel": ("POST", "/v1/batches/%00/cancel", {}, 404, "not_found"),
    "json upload": ("POST", "/v1/files", {"json": {"file": "x", "purpose": "batch"}}, 400, "invalid_body"),
    "urlencoded upload": ("POST", "/v1/files", {"data": {"purpose": "batch"}}, 400, "invalid_body"),
    "no boundary": ("POST", "/v1/files", {"content": b"--B\r\n", "headers": {"content-type": "multipart/form-data"}},
                    400, "invalid_body"),
    "truncated multipart": ("POST", "/v1/files", {"content": form(("file", "x", "a.jsonl"))[0][:30],
                                                  "headers": form()[1]}, 400, None),
    "two files": ("POST", "/v1/files", dict(zip(("content", "headers"), form(
        ("purpose", "batch", None), ("file", "x", "a.jsonl"), ("file", "y", "b.jsonl")), strict=True)), 400,
        "invalid_body"),
    "huge purpose field": ("POST", "/v1/files", dict(zip(("content", "headers"), form(
        ("purpose", "b" * 100_000, None), ("file", "x", "a.jsonl")), strict=True)), 400, "invalid_body"),
    "file as text": ("POST", "/v1/files", dict(zip(("content", "headers"), form(
        ("purpose", "batch", None), ("file", "x", None)), strict=True)), 400, "missing_required_parameter"),
    "bad content-length": ("POST", "/v1/files", {"content": b"", "headers": {
        "content-type": "multipart/form-data; boundary=B", "content-length": "9" * 5000}}, 413, "file_too_large"),
}


def test_malformed_requests_get_openai_shaped_4xx(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine())
        try:
            for name, (method, url, kwargs, status, code) in MALFORMED.items():
                r = await h.http.request(method, url, **kwargs)
                assert r.status_code == status, (name, r.status_code, r.text[:300])
                openai_error(r, status, code)
        finally:
            await h.close()

    run(body())


# ---------------------------------------------------------------------------- no input spins the runner


def test_a_custom_id_that_is_not_unicode_text_fails_its_line_alone(tmp_path):
    """A lone surrogate escape in custom_id ("\\ud800") cannot be stored: it kept the batch in
    `validating`, retried as fast as the loop turned (issue 21)."""
    async def body():
        engine = FakeEngine()
        h = Harness(tmp_path, engine)
        try:
            lone = {**line("x"), "custom_id": "\ud800"}
            batch = await h.wait((await h.submit([line("a"), lone, line("b\u0000c")]))["id"], timeout=10)
            assert batch["status"] == "completed", batch
            assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
            assert [o["custom_id"] for o in await h.content(batch["output_file_id"])] == ["a", "b\u0000c"]
            (failed,) = await h.content(batch["error_file_id"])
            assert failed["custom_id"] is None and failed["response"]["status_code"] == 400
            error = failed["response"]["body"]["error"]
            assert (error["code"], error["param"]) == ("invalid_custom_id", "custom_id")
            assert error["message"] == ("line 2: custom_id '\\ud800' is not Unicode text (it holds a lone surrogate), "
                                        "so it cannot be stored or returned")
            assert engine.calls == {"a": 1, "b\u0000c": 1}
        finally:
            await h.close()

    run(body())


def test_a_batch_task_that_keeps_failing_backs_off_then_fails_the_batch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runner, "TASK_RETRY_PAUSE", 0.1)
    calls: list[float] = []

    async def body():
        h = Harness(tmp_path, FakeEngine())
        try:
            def cannot_store(*args, **kwargs):
                calls.append(time.monotonic())
                raise sqlite3.OperationalError("disk I/O error")

            h.service.store.save_validation = cannot_store
            batch = await h.wait((await h.submit([line("a")]))["id"], timeout=15)
            assert batch["status"] == "failed"
            (error,) = batch["errors"]["data"]
            assert error["code"] == "internal_error" and error["line"] is None
            assert error["message"] == (f"the server failed {runner.MAX_TASK_FAILURES} times in a row while processing "
                                        "this batch (OperationalError('disk I/O error'))")
        finally:
            await h.close()

    with caplog.at_level("ERROR", logger="vllm.steerserve.batch"):
        run(body())
    assert len(calls) == runner.MAX_TASK_FAILURES
    pauses = [b - a for a, b in zip(calls, calls[1:])]
    assert all(p >= 0.1 * 2 ** i for i, p in enumerate(pauses)), pauses  # 0.1, 0.2, 0.4, 0.8 s at least
    assert len(caplog.records) == runner.MAX_TASK_FAILURES + 1  # one per failure, one for giving up


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """The interactive API's JSON parser skips a UTF-8 BOM; the batch reader did not, and the
    first line was `invalid_json`."""
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_bytes(jsonl([line("a"), line("b")]))
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    parsed = parse_input_file(marked, "batch_x", CHAT, max_lines=10)
    assert parsed.errors == [] and parsed.early_results == []
    assert parsed.lines == parse_input_file(plain, "batch_x", CHAT, max_lines=10).lines
    assert [x.custom_id for x in parsed.lines] == ["a", "b"]


def test_batch_lines_run_behind_interactive_requests_within_the_client_range(tmp_path):
    """Batch lines go at priority 1 or later (vLLM serves lower numbers first), clamped into
    --client-priority-range like any client's, so a line never outranks what a client may send."""
    from steerserve.limits import PriorityRange

    async def priorities(data_dir, allowed: PriorityRange | None) -> list[int]:
        h = Harness(data_dir, FakeEngine(), **({"client_priority_range": allowed} if allowed else {}))
        try:
            lines = [line("a"), line("b", priority=-5), line("c", priority=9), line("d", priority="x")]
            batch = await h.wait((await h.submit(lines))["id"])
            return [o["response"]["body"]["echo"]["priority"] for o in await h.content(batch["output_file_id"])]
        finally:
            await h.close()

    assert run(priorities(tmp_path / "default", None)) == [1, 1, 9, 1]
    assert run(priorities(tmp_path / "narrow", PriorityRange(3, 4))) == [3, 3, 4, 3]
