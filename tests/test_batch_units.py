"""Files + Batches API against a fake completions app (no vLLM): seconds, not minutes.

The real server is covered by test_batch_api.py; here the fake app lets the tests control
timing and failures (slow lines, 5xx, aborted choices, a dead engine) and restart the service
on the same data directory to check resumption.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from argparse import Namespace
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from steerserve.batch import attach_batch_api, line_executor, runner, start_batch_service
from steerserve.batch.lines import parse_input_file
from steerserve.batch.store import Store

CHAT = "/v1/chat/completions"


class FakeEngine:
    """A stand-in for vLLM's OpenAI app and engine client: each body says how to answer (`sleep`,
    `status`, `abort`, `wait`, `kill`: the engine dies, the requests waiting answer to a dead
    engine, and this one never answers)."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.company: dict[str, list[int]] = {}  # tag -> other requests in flight at each call
        self.in_flight = 0
        self.errored = False  # read by the service as the engine client's `errored`
        self.release = asyncio.Event()  # lines with "wait": true block until set

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post(CHAT)
        @app.post("/v1/completions")
        async def complete(request: Request):
            body = await request.json()
            tag = body.get("tag", "?")
            self.calls[tag] += 1
            self.company.setdefault(tag, []).append(self.in_flight)
            self.in_flight += 1
            try:
                return await self.answer(body)
            finally:
                self.in_flight -= 1

        attach_batch_api(app)
        return app

    async def answer(self, body: dict):
        if body.get("kill"):
            self.errored = True
            self.release.set()
            await asyncio.Future()  # never answers: the process is about to be killed
        if body.get("wait"):
            await self.release.wait()
        await asyncio.sleep(body.get("sleep", 0))
        if "status" in body:
            return JSONResponse({"error": {"message": "no", "type": "invalid_request_error", "param": "x",
                                           "code": "bad"}}, status_code=body["status"])
        finish = "abort" if body.get("abort") else "stop"
        return {"id": "cmpl", "choices": [{"index": 0, "finish_reason": finish}], "echo": body}


def line(custom_id: str, url: str = CHAT, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"tag": custom_id, **body}}


def jsonl(lines) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


class Harness:
    def __init__(self, data_dir: Path, engine: FakeEngine, **args):
        self.engine = engine
        self.app = engine.app()
        ns = Namespace(data_dir=str(data_dir), scheduling_policy=args.pop("policy", "priority"),
                       batch_concurrency=args.pop("concurrency", 2), api_key=None, **args)  # + limits
        self.service = start_batch_service(self.app, engine, self.app.state, ns)
        self.engine_client = engine
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")

    async def submit(self, lines, endpoint: str = CHAT, window: str = "24h") -> dict:
        f = (await self.http.post("/v1/files", files={"file": ("in.jsonl", jsonl(lines))},
                                  data={"purpose": "batch"})).json()
        r = await self.http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": endpoint,
                                                      "completion_window": window})
        assert r.status_code == 200, r.text
        return r.json()

    async def get(self, batch_id: str) -> dict:
        return (await self.http.get(f"/v1/batches/{batch_id}")).json()

    async def wait(self, batch_id: str, until=("completed", "failed", "cancelled", "expired"), timeout=20) -> dict:
        for _ in range(int(timeout / 0.05)):
            batch = await self.get(batch_id)
            if batch["status"] in until:
                return batch
            await asyncio.sleep(0.05)
        raise AssertionError(f"batch still {batch['status']}: {batch}")

    async def content(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        r = await self.http.get(f"/v1/files/{file_id}/content")
        assert r.status_code == 200
        return [json.loads(x) for x in r.text.splitlines()]

    async def close(self) -> None:
        await self.service.stop()
        await self.http.aclose()


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- parsing


def test_parse_input_file_sorts_line_problems_from_file_problems(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([
        line("a"), "{not json", line("b", url="/v1/embeddings"), {**line("c"), "method": "GET"},
        {"custom_id": "d", "method": "POST", "url": CHAT, "body": "text"}, line("e", stream=True), "", line("f"),
    ]))
    parsed = parse_input_file(path, "batch_x", CHAT, max_lines=100)
    assert parsed.errors == []
    assert [x.custom_id for x in parsed.lines] == ["a", None, "b", "c", "d", "e", "f"]
    codes = {r.index: r.record["response"]["body"]["error"]["code"] for r in parsed.early_results}
    assert codes == {1: "invalid_json", 2: "invalid_url", 3: "invalid_method", 4: "invalid_body", 5: "invalid_body"}
    assert all(r.record["response"]["status_code"] == 400 for r in parsed.early_results)
    assert parsed.early_results[0].record["response"]["body"]["error"]["message"].startswith("line 2:")


@pytest.mark.parametrize("content, code", [
    (jsonl([line("a"), line("b"), line("a")]), "duplicate_custom_id"),
    (b"hello\nworld\n", "invalid_file_format"),
    (b'[{"custom_id": "a"}]\n', "invalid_file_format"),
    (b"\xff\xfe\x00binary", "invalid_file_format"),
    (b"\n\n", "empty_file"),
])
def test_parse_input_file_rejects_whole_file(tmp_path, content, code):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    errors = parse_input_file(path, "batch_x", CHAT, max_lines=100).errors
    assert [e["code"] for e in errors] == [code]
    if code == "duplicate_custom_id":
        assert errors[0]["line"] == 3 and "line 1" in errors[0]["message"]


# ---------------------------------------------------------------------------- service


def test_batch_runs_lines_with_priority_and_splits_output_and_errors(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine())
        try:
            batch = await h.submit([line("a"), line("b", status=400), "oops", line("c", priority=5)])
            batch = await h.wait(batch["id"])
            assert batch["status"] == "completed"
            assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
            assert batch["in_progress_at"] and batch["finalizing_at"] and batch["completed_at"]
            out, err = await h.content(batch["output_file_id"]), await h.content(batch["error_file_id"])
            assert [o["custom_id"] for o in out] == ["a", "c"]
            assert [o["response"]["body"]["echo"]["priority"] for o in out] == [1, 5]  # never raised above
            assert [e["custom_id"] for e in err] == ["b", None]
            assert err[0]["response"] == {"status_code": 400, "request_id": err[0]["response"]["request_id"],
                                          "body": {"error": {"message": "no", "type": "invalid_request_error",
                                                             "param": "x", "code": "bad"}}}
            files = (await h.http.get("/v1/files")).json()
            assert {f["purpose"] for f in files["data"]} == {"batch", "batch_output"}
        finally:
            await h.close()

    run(body())


def test_fcfs_engine_gets_no_priority(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine(), policy="fcfs")
        try:
            batch = await h.wait((await h.submit([line("a")]))["id"])
            (out,) = await h.content(batch["output_file_id"])
            assert "priority" not in out["response"]["body"]["echo"]
        finally:
            await h.close()

    run(body())


def test_validation_failure_sets_errors(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine())
        try:
            batch = await h.wait((await h.submit([line("a"), line("a")]))["id"])
            assert batch["status"] == "failed" and batch["failed_at"]
            assert batch["errors"]["object"] == "list"
            assert batch["errors"]["data"][0]["code"] == "duplicate_custom_id"
            assert batch["errors"]["data"][0]["line"] == 2
            assert batch["output_file_id"] is None and h.engine.calls == Counter()
        finally:
            await h.close()

    run(body())


def test_restart_resumes_without_redoing_recorded_lines(tmp_path):
    async def first_part():
        engine = FakeEngine()
        h = Harness(tmp_path, engine, concurrency=2)
        batch = await h.submit([line(f"r{i}", wait=i >= 4) for i in range(10)])
        for _ in range(400):
            if (await h.get(batch["id"]))["request_counts"]["completed"] >= 4:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # r4, r5 are now in flight and blocked
        h.service.begin_shutdown()  # what the engine-shutdown hook calls
        engine.release.set()  # they answer, but during shutdown: must not count
        await asyncio.sleep(0.2)
        await h.close()
        return batch["id"], engine.calls

    async def second_part(batch_id):
        engine = FakeEngine()
        engine.release.set()
        h = Harness(tmp_path, engine)
        try:
            batch = await h.wait(batch_id)
            return batch, await h.content(batch["output_file_id"]), engine.calls
        finally:
            await h.close()

    batch_id, calls_before = run(first_part())
    store = Store(tmp_path)
    assert [p.attempts for p in store.pending_lines(batch_id)] == [0] * 6  # a clean stop charges nothing
    store.close()
    batch, out, calls_after = run(second_part(batch_id))
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(10))
    assert all(calls_after[f"r{i}"] == 0 for i in range(4))  # recorded before the stop: not re-run
    assert all(calls_after[f"r{i}"] == 1 for i in range(4, 10))
    assert calls_before["r4"] == 1 and calls_before["r5"] == 1


def test_cancel_in_progress_keeps_partial_results_consistent(tmp_path):
    async def body():
        engine = FakeEngine()
        h = Harness(tmp_path, engine, concurrency=2)
        try:
            batch = await h.submit([line(f"r{i}", wait=i >= 3) for i in range(8)])
            for _ in range(400):
                if (await h.get(batch["id"]))["request_counts"]["completed"] >= 3:
                    break
                await asyncio.sleep(0.05)
            cancelled = (await h.http.post(f"/v1/batches/{batch['id']}/cancel")).json()
            assert cancelled["status"] in ("cancelling", "cancelled") and cancelled["cancelling_at"]
            batch = await h.wait(batch["id"])
            assert batch["status"] == "cancelled" and batch["cancelled_at"]
            counts = batch["request_counts"]
            out = await h.content(batch["output_file_id"])
            assert counts == {"total": 8, "completed": 3, "failed": 0}
            assert sorted(o["custom_id"] for o in out) == ["r0", "r1", "r2"]
            again = await h.http.post(f"/v1/batches/{batch['id']}/cancel")
            assert again.status_code == 200 and again.json()["status"] == "cancelled"
            done = await h.wait((await h.submit([line("z")]))["id"])
            conflict = await h.http.post(f"/v1/batches/{done['id']}/cancel")
            assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "invalid_state"
        finally:
            engine.release.set()
            await h.close()

    run(body())


def test_server_errors_retry_then_fail_and_dead_engine_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(line_executor, "SERVER_ERROR_ATTEMPTS", 2)
    monkeypatch.setattr(runner, "RETRY_PAUSE", 0.2)

    async def body():
        engine = FakeEngine()
        h = Harness(tmp_path, engine)
        try:
            batch = await h.wait((await h.submit([line("boom", status=500), line("ab", abort=True)]))["id"],
                                 timeout=30)
            err = await h.content(batch["error_file_id"])
            assert [e["response"]["status_code"] for e in err] == [500, 500]
            assert err[1]["response"]["body"]["error"]["code"] == "aborted"
            assert engine.calls["boom"] == 2 and engine.calls["ab"] == 2

            h.engine_client.errored = True  # engine dead: no line is sent to it, none is charged an attempt
            batch = await h.submit([line("later", status=500)])
            await asyncio.sleep(1.0)
            assert (await h.get(batch["id"]))["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
            assert engine.calls["later"] == 0
            assert h.service.store.pending_lines(batch["id"]) == [(0, 0)]
            h.engine_client.errored = False
            (err,) = await h.content((await h.wait(batch["id"]))["error_file_id"])
            assert err["response"]["body"]["error"]["code"] == "bad"  # its own answer, not engine_failure
        finally:
            await h.close()

    run(body())


def test_expired_batch_reports_unfinished_lines(tmp_path):
    async def body():
        engine = FakeEngine()
        h = Harness(tmp_path, engine, concurrency=1)
        try:
            batch = await h.submit([line("a"), line("b", wait=True), line("c")], window="1h")
            for _ in range(200):
                if (await h.get(batch["id"]))["request_counts"]["completed"] >= 1:
                    break
                await asyncio.sleep(0.05)
            with h.service.store._tx() as c:  # move the deadline into the past while b runs
                c.exec_driver_sql("UPDATE batches SET expires_at = 0 WHERE id = ?", (batch["id"],))
            batch = await h.wait(batch["id"])
            assert batch["status"] == "expired" and batch["expired_at"]
            assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
            err = await h.content(batch["error_file_id"])
            assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in err] == [
                ("b", None, "batch_expired"), ("c", None, "batch_expired")]
            assert [x["custom_id"] for x in await h.content(batch["output_file_id"])] == ["a"]
        finally:
            engine.release.set()
            await h.close()

    run(body())


def test_api_errors_and_pagination(tmp_path):
    async def body():
        h = Harness(tmp_path, FakeEngine())
        try:
            f = (await h.http.post("/v1/files", files={"file": ("in.jsonl", jsonl([line("a")]))},
                                   data={"purpose": "batch"})).json()
            assert f["object"] == "file" and f["purpose"] == "batch" and f["bytes"] > 0
            bad = {
                "input_file_id": ({"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"}, 404),
                "endpoint": ({"input_file_id": f["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}, 400),
                "completion_window": ({"input_file_id": f["id"], "endpoint": CHAT, "completion_window": "2d"}, 400),
            }
            for param, (payload, status) in bad.items():
                r = await h.http.post("/v1/batches", json=payload)
                assert r.status_code == status and r.json()["error"]["param"] == param, r.text
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = await h.http.post("/v1/files", files={"file": ("x", b"{}")}, data={"purpose": "nonsense"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
            assert (await h.http.get("/v1/batches/batch_nope")).status_code == 404

            ids = [(await h.submit([line("a")]))["id"] for _ in range(5)]
            page = (await h.http.get("/v1/batches", params={"limit": 2})).json()
            assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
            assert page["first_id"] == ids[4] and page["last_id"] == ids[3]
            page = (await h.http.get("/v1/batches", params={"limit": 2, "after": ids[1]})).json()
            assert [b["id"] for b in page["data"]] == [ids[0]] and not page["has_more"]

            deleted = (await h.http.delete(f"/v1/files/{f['id']}")).json()
            assert deleted == {"id": f["id"], "object": "file", "deleted": True}
            assert (await h.http.get(f"/v1/files/{f['id']}/content")).status_code == 404
        finally:
            await h.close()

    run(body())


def test_second_service_on_same_data_dir_does_not_run_batches(tmp_path):
    async def body():
        a = Harness(tmp_path, FakeEngine())
        b = Harness(tmp_path, FakeEngine())
        try:
            assert a.service._loop_task is not None and b.service._loop_task is None
            batch = await b.submit([line("x")])  # accepted by b, run by a
            batch = await b.wait(batch["id"])
            assert batch["status"] == "completed"
            assert a.engine.calls["x"] == 1 and b.engine.calls["x"] == 0
        finally:
            await a.close()
            await b.close()

    run(body())


def test_a_runner_runs_only_the_batches_its_own_server_accepted(tmp_path, caplog):
    """Two servers of one served name but different models take turns on one data dir: each
    batch is run by the runner of the server that accepted it, never by the other's."""
    async def body():
        a = Harness(tmp_path, FakeEngine(), model="models/a", served_model_name=["fortunes-qwen3.5"])
        batch_a = await a.submit([line("for-a", wait=True)])
        await a.close()  # A stops before its line could run
        b = Harness(tmp_path, FakeEngine(), model="models/b", served_model_name=["fortunes-qwen3.5"])
        try:
            batch_b = await b.submit([line("for-b")])
            assert (await b.wait(batch_b["id"]))["status"] == "completed"
            await asyncio.sleep(2 * runner.POLL_SECONDS)  # passes of B's runner that see A's batch
            assert (await b.get(batch_a["id"]))["status"] in ("validating", "in_progress")
            assert b.engine.calls == Counter({"for-b": 1})
        finally:
            await b.close()
        a = Harness(tmp_path, FakeEngine(), model="models/a", served_model_name=["fortunes-qwen3.5"])
        a.engine.release.set()
        try:
            assert (await a.wait(batch_a["id"]))["status"] == "completed"
            assert a.engine.calls == Counter({"for-a": 1})
        finally:
            await a.close()
        return b.service.identity

    with caplog.at_level("WARNING", logger="vllm.steerserve.batch"):
        b_identity = run(body())
    skipped = [r.getMessage() for r in caplog.records if "accepted by another server" in r.getMessage()]
    assert len(skipped) == 1, skipped  # logged once, however many passes skipped it
    assert f"this runner (identity {b_identity.key}: model models/b served as fortunes-qwen3.5" in skipped[0]


def test_a_server_of_another_identity_is_refused_a_data_dir_whose_runner_is_held(tmp_path):
    """API processes of one server share the data dir (one runs the batches); a server of
    another model is refused, naming --data-dir, at the command line and in the app."""
    from steerserve.batch.identity import DataDirInUse, RunnerLock, server_identity

    async def body():
        a = Harness(tmp_path, FakeEngine(), model="models/a", served_model_name=["fortunes-qwen3.5"])
        same = Harness(tmp_path, FakeEngine(), model="models/a", served_model_name=["fortunes-qwen3.5"])
        try:
            assert a.service._loop_task is not None and same.service._loop_task is None
            other = Namespace(model="models/b", served_model_name=["fortunes-qwen3.5"])
            with pytest.raises(DataDirInUse) as refused:
                Harness(tmp_path, FakeEngine(), **vars(other))
            with pytest.raises(DataDirInUse):
                RunnerLock(tmp_path).refuse_other_holder(server_identity(other))
            RunnerLock(tmp_path).refuse_other_holder(a.service.identity)
        finally:
            await same.close()
            await a.close()
        RunnerLock(tmp_path).refuse_other_holder(server_identity(other))  # free once A stopped
        return str(refused.value)

    message = run(body())
    assert message == (
        f"--data-dir {tmp_path} is in use by another steerserve server (model models/a served as fortunes-qwen3.5 "
        f"(no SAE, dtype None), pid {os.getpid()}), whose batch runner holds {tmp_path}/runner.lock; this server "
        "(model models/b served as fortunes-qwen3.5 (no SAE, dtype None)) would accept batches only that one could "
        "run: give it a --data-dir of its own")


@pytest.mark.parametrize("change", [
    {"model": "models/other"},
    {"additional_config": {"steerserve": {"sae_path": "sae/other", "sae_layers": [1]}}},
    {"additional_config": {"steerserve": {"sae_path": "sae/x", "sae_layers": [2]}}},
    {"dtype": "float32"},
])
def test_servers_of_one_served_name_differ_by_model_sae_and_dtype(change):
    from steerserve.batch.identity import server_identity

    base = {"model": "models/x", "served_model_name": ["fortunes-qwen3.5"], "dtype": "bfloat16",
            "additional_config": {"steerserve": {"sae_path": "sae/x", "sae_layers": [1], "max_features": 64}}}
    same = dict(base, additional_config={"steerserve": {"sae_path": "sae/x", "sae_layers": [1], "max_features": 8}})
    assert server_identity(Namespace(**base)) == server_identity(Namespace(**same))  # limits are not identity
    assert server_identity(Namespace(**base)).key != server_identity(Namespace(**base | change)).key


def test_a_holder_still_writing_its_identity_is_waited_for(tmp_path):
    """API processes of one server start together: one may read the lock file between the
    holder's flock and its write (empty, or the previous holder's identity) and must not refuse."""
    import threading

    from steerserve.batch.identity import RunnerLock, server_identity

    ours, previous = server_identity(Namespace(model="models/a")), server_identity(Namespace(model="models/b"))
    (tmp_path / "runner.lock").write_text(previous.to_json())
    fd = os.open(tmp_path / "runner.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # locked, the previous identity still written
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, ours.to_json().encode().ljust(200), 0))
    writer.start()
    try:
        RunnerLock(tmp_path).refuse_other_holder(ours)
    finally:
        writer.join()
        os.close(fd)
