"""The batch executor: a reconciler that drives every unfinished batch to its next state.

The database is the truth; this class only holds tasks. Every second (and at once when an
endpoint wakes it) it reads the unfinished batches and starts what each needs: validation for
`validating`, execution for the oldest `in_progress`, finalize for `finalizing` and
`cancelling`. After a restart the same loop resumes whatever a crash left behind.

Each line is POSTed through the server's own ASGI app in-process, so it gets the interactive
path's validation, steering translation, admission, echo and error objects (no second code
path), and shares the engine with interactive traffic: at most `concurrency` lines in flight,
and `priority` 1 (served after interactive requests) when the engine schedules by priority.

A line is done when its result row is committed. Answers that are not the line's real answer
are never recorded: anything produced while the server shuts down, a 5xx while the engine is
dead, or a choice the engine aborted. Those lines stay pending and run again.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import random
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from ..in_process import in_process_client
from ..errors import APIError
from .lines import expired_line, line_id, parse_input_file, response_record, result_file_id
from .store import BatchRecord, FileRecord, InputLine, LineResult, Store, now

logger = logging.getLogger("vllm.steerserve.batch")  # under vLLM's configured "vllm" logger

POLL_SECONDS = 1.0
SERVER_ERROR_ATTEMPTS = 3  # a line whose 5xx repeats this often (engine healthy) is recorded as failed
RETRY_PAUSE = 5.0  # after a pass that left lines pending (engine trouble), before the next pass


class BatchService:
    def __init__(
        self,
        store: Store,
        app: Any,
        *,
        concurrency: int = 4,
        priority: int | None = None,
        api_key: str | None = None,
        engine_dead: Callable[[], bool] = lambda: False,
    ):
        self.store = store
        self.concurrency = max(1, concurrency)
        self.priority = priority
        self._engine_dead = engine_dead
        self._client = in_process_client(app, api_key)
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task | None = None
        self._busy: dict[str, asyncio.Task] = {}  # batch id -> the task handling it (strong refs)
        self._in_flight: dict[str, set[asyncio.Task]] = {}  # batch id -> running line requests
        self._not_before: dict[str, float] = {}  # batch id -> loop time of its next execution pass
        self._executing: str | None = None  # the one batch whose lines run now
        self._cancel_requested: set[str] = set()  # batches whose workers must take no new line
        self._lock_file: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        """Start the reconciler unless another process already runs batches from this data dir.

        With several API processes (`--api-server-count`) or two servers on one data dir, only
        the holder of the lock executes; the others still serve the API from the same database.
        """
        fd = os.open(self.store.data_dir / "runner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            logger.warning("another process runs the batches of %s; this one only serves the API",
                           self.store.data_dir)
            return False
        self._lock_file = fd
        self._loop_task = asyncio.get_running_loop().create_task(self._reconcile_forever(), name="steerserve-batches")
        return True

    def begin_shutdown(self) -> None:
        """Called (from any thread) before the engine stops: from now on nothing is recorded, so
        requests the engine aborts on its way down stay pending for the next start."""
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._loop_task, *self._busy.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        self.store.close()
        logger.info("batches: stopped; unfinished batches resume at the next start")

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ reconciler

    async def _reconcile_forever(self) -> None:
        while not self._stopping:
            try:
                await self._reconcile()
            except Exception:
                logger.exception("batch reconciler pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _reconcile(self) -> None:
        batches = await asyncio.to_thread(self.store.active_batches)
        loop_time = asyncio.get_running_loop().time()
        for batch in batches:
            stop_lines = batch.status == "cancelling" or (batch.status == "in_progress" and _expired(batch))
            if stop_lines and batch.id == self._executing:
                self._cancel_requested.add(batch.id)
                for task in self._in_flight.get(batch.id, ()):
                    task.cancel()  # the executor then finalizes the batch as cancelled or expired
            if batch.id in self._busy:
                continue
            if batch.status == "validating":
                self._spawn(batch.id, self._validate(batch))
            elif batch.status == "finalizing":
                self._spawn(batch.id, self._finalize(batch.id, ("finalizing",), "completed"))
            elif batch.status == "cancelling":
                self._spawn(batch.id, self._finalize(batch.id, ("cancelling",), "cancelled"))
            elif batch.status == "in_progress":
                if _expired(batch):
                    self._spawn(batch.id, self._expire(batch))
                elif self._executing is None and loop_time >= self._not_before.get(batch.id, 0.0):
                    self._executing = batch.id  # one batch at a time, oldest first
                    self._spawn(batch.id, self._execute(batch))

    def _spawn(self, batch_id: str, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"steerserve-batch-{batch_id}")
        self._busy[batch_id] = task

        def done(t: asyncio.Task) -> None:
            if self._busy.get(batch_id) is t:
                del self._busy[batch_id]
            if self._executing == batch_id:
                self._executing = None
            if not t.cancelled() and t.exception() is not None:
                logger.error("batch %s: %r", batch_id, t.exception(), exc_info=t.exception())
                self._not_before[batch_id] = asyncio.get_running_loop().time() + RETRY_PAUSE
            self._wake.set()

        task.add_done_callback(done)

    # ------------------------------------------------------------------ states

    async def _validate(self, batch: BatchRecord) -> None:
        path = self.store.file_path(batch.input_file_id)
        parsed = await asyncio.to_thread(parse_input_file, path, batch.id, batch.endpoint)
        if parsed.errors:
            await asyncio.to_thread(self.store.transition, batch.id, ("validating",), "failed",
                                    errors=parsed.errors, failed_at=now())
        else:
            await asyncio.to_thread(self.store.save_validation, batch.id, parsed.lines, parsed.early_results)

    async def _execute(self, batch: BatchRecord) -> None:
        self._in_flight[batch.id] = set()
        try:
            pending = deque(await asyncio.to_thread(self.store.pending_lines, batch.id))
            workers = [asyncio.create_task(self._worker(batch, pending))
                       for _ in range(min(self.concurrency, len(pending)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        finally:
            del self._in_flight[batch.id]
            self._cancel_requested.discard(batch.id)
        if self._stopping:
            return
        current = await asyncio.to_thread(self.store.get_batch, batch.id)
        if current is None:
            return
        if current.status == "cancelling":
            await self._finalize(batch.id, ("cancelling",), "cancelled")
        elif current.status == "in_progress":
            if _expired(current):
                await self._expire(current)
            elif not await asyncio.to_thread(self.store.pending_lines, batch.id):
                if await asyncio.to_thread(self.store.transition, batch.id, ("in_progress",), "finalizing",
                                           finalizing_at=now()):
                    await self._finalize(batch.id, ("finalizing",), "completed")
            else:  # lines the engine could not answer: try again a little later
                self._not_before[batch.id] = asyncio.get_running_loop().time() + RETRY_PAUSE

    async def _worker(self, batch: BatchRecord, pending: deque[int]) -> None:
        in_flight = self._in_flight[batch.id]
        while pending and not self._stopping and batch.id not in self._cancel_requested:
            line = await asyncio.to_thread(self.store.get_line, batch.id, pending.popleft())
            request = asyncio.create_task(self._run_line(batch.id, line))
            in_flight.add(request)
            try:
                result = await request
            except asyncio.CancelledError:
                if request.cancelled() and not _current_task_cancelling():
                    return  # this line was cancelled with its batch; the worker just stops
                raise
            finally:
                in_flight.discard(request)
            if result is None or self._stopping:
                return  # not a real answer (engine down or going down): the line stays pending
            await asyncio.to_thread(self.store.record_results, batch.id, [result])

    async def _expire(self, batch: BatchRecord) -> None:
        pending = await asyncio.to_thread(self.store.pending_lines, batch.id)
        results = []
        for index in pending:
            line = await asyncio.to_thread(self.store.get_line, batch.id, index)
            results.append(expired_line(batch.id, index, line.custom_id))
        await asyncio.to_thread(self.store.record_results, batch.id, results)
        await self._finalize(batch.id, ("in_progress",), "expired")

    async def _finalize(self, batch_id: str, from_statuses: tuple[str, ...], to_status: str) -> None:
        await asyncio.to_thread(self._write_files_and_finish, batch_id, from_statuses, to_status)

    def _write_files_and_finish(self, batch_id: str, from_statuses: tuple[str, ...], to_status: str) -> None:
        """Build output and error files from the result rows (idempotent: fixed file ids, so a
        crash mid-finalize just writes them again), then set the final status."""
        names = {True: "output", False: "error"}
        ids = {ok: result_file_id(batch_id, name) for ok, name in names.items()}
        tmp = {ok: self.store.file_path(ids[ok]).with_suffix(".tmp") for ok in names}
        sizes = {True: 0, False: 0}
        handles = {ok: open(tmp[ok], "wb") for ok in names}
        try:
            for ok, record in self.store.iter_results(batch_id):
                data = record.encode() + b"\n"
                handles[ok].write(data)
                sizes[ok] += len(data)
            for h in handles.values():
                h.flush()
                os.fsync(h.fileno())
        finally:
            for h in handles.values():
                h.close()
        files = []
        for ok, name in names.items():
            if sizes[ok]:
                os.replace(tmp[ok], self.store.file_path(ids[ok]))
                files.append(FileRecord(ids[ok], f"{batch_id}_{name}.jsonl", "batch_output", sizes[ok], now()))
            else:
                tmp[ok].unlink(missing_ok=True)
        stamp = now()
        fields: dict[str, Any] = {
            "output_file_id": ids[True] if sizes[True] else None,
            "error_file_id": ids[False] if sizes[False] else None,
            f"{to_status}_at": stamp,
        }
        self.store.finish(batch_id, from_statuses, to_status, files, **fields)

    # ------------------------------------------------------------------ one line

    async def _run_line(self, batch_id: str, line: InputLine) -> LineResult | None:
        """The line's answer, or None when there is no real answer to record now."""
        body = json.loads(line.body)
        if self.priority is not None:
            given = body.get("priority")
            if not isinstance(given, int) or isinstance(given, bool) or given < self.priority:
                body["priority"] = self.priority
        content = json.dumps(body).encode()
        server_errors = 0
        busy_waits = 0
        while True:
            request_id = f"{line_id(batch_id, line.index)}-{uuid.uuid4().hex[:8]}"
            headers = {"content-type": "application/json", "x-request-id": request_id}
            try:
                response = await self._client.post(line.url, content=content, headers=headers)
                status, payload = response.status_code, _json_or_error(response)
            except Exception as exc:  # the app itself failed; treat like a 500
                logger.exception("batch %s line %d failed in the app", batch_id, line.index)
                status = 500
                payload = APIError(f"internal error: {exc!r}", code="internal_error", status=500,
                                   type="server_error").body()
            if self._stopping or self._engine_dead():
                return None
            if status == 503:  # overloaded (queue limits): wait, it is not the line's fault
                busy_waits += 1
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(busy_waits, 6)) * (0.5 + random.random()))
                continue
            aborted = status == 200 and _was_aborted(payload)
            if status < 500 and not aborted:
                record = response_record(batch_id, line.index, line.custom_id, status, request_id, payload)
                return LineResult(line.index, 200 <= status < 300, record)
            server_errors += 1
            if server_errors >= SERVER_ERROR_ATTEMPTS:
                if aborted:
                    status, payload = 500, APIError("the engine aborted this request", code="aborted",
                                                    status=500, type="server_error").body()
                record = response_record(batch_id, line.index, line.custom_id, status, request_id, payload)
                return LineResult(line.index, False, record)
            await asyncio.sleep(2.0 ** server_errors)


def _expired(batch: BatchRecord) -> bool:
    return batch.expires_at is not None and now() >= batch.expires_at


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _json_or_error(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return APIError(response.text[:2000] or f"HTTP {response.status_code}", code="invalid_response",
                        status=response.status_code, type="server_error").body()


def _was_aborted(payload: Any) -> bool:
    """A choice the engine aborted (e.g. while stopping) is not the request's answer."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    return any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices or ())
