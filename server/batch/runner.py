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

Poison pills: every send of a line is counted in the database before it goes out, so after a
crash (even kill -9) the lines that were in flight are known. They run first, one at a time
with nothing else in flight, so a line that merely shared a crash is cleared and the line that
causes it is caught alone; a line the engine died on MAX_LINE_ATTEMPTS times is recorded as
failed (`engine_failure`) instead of crashing the engine again at every start. A clean stop
does not count against the lines it interrupts.

No input spins the loop: a batch's task (validation, execution, finalize) that raises is retried
after a pause that doubles each time (TASK_RETRY_PAUSE up to TASK_RETRY_MAX), and after
MAX_TASK_FAILURES in a row the batch is failed with the error, instead of being retried as fast
as the loop turns; the log says each failure once, and repeats of the reconciler's own failures
at most once per LOG_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from steerserve.errors import APIError
from steerserve.in_process import in_process_client
from steerserve.limits import Limits
from steerserve.batch.lines import engine_failure_line, expired_line, line_id, parse_input_file, response_record
from steerserve.batch.store import BatchRecord, FileRecord, InputLine, LineResult, PendingLine, Store, now

logger = logging.getLogger("vllm.steerserve.batch")  # under vLLM's configured "vllm" logger

POLL_SECONDS = 1.0
SERVER_ERROR_ATTEMPTS = 3  # a line whose 5xx repeats this often (engine healthy) is recorded as failed
RETRY_PAUSE = 5.0  # after a pass that left lines pending (engine trouble), before the next pass
MAX_LINE_ATTEMPTS = 3  # sends of one line that ended with the engine or server dead: then it fails
TASK_RETRY_PAUSE = 1.0  # after a batch's task raised; doubled at each failure in a row
TASK_RETRY_MAX = 300.0
MAX_TASK_FAILURES = 5  # failures in a row of a batch's task: then the batch fails
LOG_EVERY = 60.0  # seconds between two log lines of the same repeated failure


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
        limits: Limits = Limits(),  # frozen: one shared default is safe
    ):
        self.store = store
        self.limits = limits  # the routes read the upload and line limits here
        self.concurrency = max(1, concurrency)
        self.priority = priority
        self._engine_dead = engine_dead
        self._client = in_process_client(app, api_key)
        self._wake = asyncio.Event()
        self._stopping = False
        self._clean_stop = False  # the engine was healthy when the stop began
        self._charged: set[tuple[str, int]] = set()  # (batch id, line) sent, attempt counted, no answer yet
        self._loop_task: asyncio.Task | None = None
        self._busy: dict[str, asyncio.Task] = {}  # batch id -> the task handling it (strong refs)
        self._in_flight: dict[str, set[asyncio.Task]] = {}  # batch id -> running line requests
        self._not_before: dict[str, float] = {}  # batch id -> loop time of its next pass
        self._failures: dict[str, tuple[int, str]] = {}  # batch id -> (its task's failures in a row, the last)
        self._logged_at: dict[str, tuple[float, int]] = {}  # repeated failure -> (last logged, dropped since)
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
        requests the engine aborts on its way down stay pending for the next start. If the
        engine is still healthy the stop is clean: the lines it cuts short get their attempt back."""
        if not self._stopping:
            self._clean_stop = not self._engine_dead()
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._loop_task, *self._busy.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._clean_stop and self._charged:
            await asyncio.to_thread(self.store.refund_attempts, list(self._charged))
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
            except Exception as exc:
                self._log_throttled("reconcile", "batch reconciler pass failed: %r", exc)
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
            if batch.id in self._busy or loop_time < self._not_before.get(batch.id, 0.0):
                continue
            if self._failures.get(batch.id, (0, ""))[0] >= MAX_TASK_FAILURES:
                self._spawn(batch.id, self._give_up(batch))
            elif batch.status == "validating":
                self._spawn(batch.id, self._validate(batch))
            elif batch.status == "finalizing":
                self._spawn(batch.id, self._finalize(batch.id, ("finalizing",), "completed"))
            elif batch.status == "cancelling":
                self._spawn(batch.id, self._finalize(batch.id, ("cancelling",), "cancelled"))
            elif batch.status == "in_progress":
                if _expired(batch):
                    self._spawn(batch.id, self._expire(batch))
                elif self._executing is None:
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
                self._task_failed(batch_id, t.exception())
            elif not t.cancelled():
                self._failures.pop(batch_id, None)
            self._wake.set()

        task.add_done_callback(done)

    def _task_failed(self, batch_id: str, exc: BaseException) -> None:
        """Backs the batch off (the pause doubles with each failure in a row); the reconciler
        fails it once MAX_TASK_FAILURES is reached."""
        failures = self._failures.get(batch_id, (0, ""))[0] + 1
        self._failures[batch_id] = (failures, repr(exc))
        pause = min(TASK_RETRY_PAUSE * 2 ** (failures - 1), TASK_RETRY_MAX)
        self._not_before[batch_id] = asyncio.get_running_loop().time() + pause
        logger.error("batch %s: failed (%d in a row), next try in %.0f s: %r", batch_id, failures, pause, exc,
                     exc_info=exc if failures == 1 else None)

    async def _give_up(self, batch: BatchRecord) -> None:
        failures, last = self._failures[batch.id]
        error = {"code": "internal_error", "param": None, "line": None,
                 "message": f"the server failed {failures} times in a row while processing this batch ({last})"}
        if await asyncio.to_thread(self.store.transition, batch.id, (batch.status,), "failed", errors=[error],
                                   failed_at=now()):
            logger.error("batch %s: failed after %d failures in a row: %s", batch.id, failures, last)
        self._failures.pop(batch.id, None)

    def _log_throttled(self, key: str, message: str, *args: Any) -> None:
        """`message` once per LOG_EVERY seconds for `key`, saying how many repeats it dropped."""
        logged, dropped = self._logged_at.get(key, (float("-inf"), 0))
        if time.monotonic() - logged < LOG_EVERY:
            self._logged_at[key] = (logged, dropped + 1)
            return
        self._logged_at[key] = (time.monotonic(), 0)
        suffix = f" ({dropped} more like it in the last {LOG_EVERY:.0f} s not logged)" if dropped else ""
        logger.error(message + suffix, *args)

    # ------------------------------------------------------------------ states

    async def _validate(self, batch: BatchRecord) -> None:
        path = self.store.file_path(batch.input_file_id)
        parsed = await asyncio.to_thread(parse_input_file, path, batch.id, batch.endpoint,
                                         self.limits.max_batch_lines)
        if parsed.errors:
            await asyncio.to_thread(self.store.transition, batch.id, ("validating",), "failed",
                                    errors=parsed.errors, failed_at=now())
        else:
            await asyncio.to_thread(self.store.save_validation, batch.id, parsed.lines, parsed.early_results)

    async def _execute(self, batch: BatchRecord) -> None:
        self._in_flight[batch.id] = set()
        try:
            pending = await asyncio.to_thread(self.store.pending_lines, batch.id)
            await self._fail_spent_lines(batch.id, [p for p in pending if p.attempts >= MAX_LINE_ATTEMPTS])
            suspects = [p.index for p in pending if 0 < p.attempts < MAX_LINE_ATTEMPTS]
            await self._run_lines(batch.id, suspects, width=1)  # alone: see the module docstring
            await self._run_lines(batch.id, [p.index for p in pending if p.attempts == 0], self.concurrency)
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

    async def _run_lines(self, batch_id: str, indexes: list[int], width: int) -> None:
        pending = deque(indexes)
        workers = [asyncio.create_task(self._worker(batch_id, pending)) for _ in range(min(width, len(pending)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _may_send(self, batch_id: str) -> bool:
        """No line goes to a dead engine: it could not answer, and the send would count against it."""
        return not (self._stopping or self._engine_dead() or batch_id in self._cancel_requested)

    async def _worker(self, batch_id: str, pending: deque[int]) -> None:
        while pending and self._may_send(batch_id):
            result = await self._attempt(batch_id, pending.popleft())
            if result is None or self._stopping:
                return  # no real answer (batch cancelled, engine down or going down): the line stays pending
            await asyncio.to_thread(self.store.record_results, batch_id, [result])

    async def _attempt(self, batch_id: str, index: int) -> LineResult | None:
        """Send the line once, the attempt counted first; None when there is no answer to record."""
        line = await asyncio.to_thread(self.store.get_line, batch_id, index)
        key = (batch_id, index)
        self._charged.add(key)  # from here on a clean stop refunds the attempt (stop())
        try:
            await asyncio.to_thread(self.store.begin_attempt, batch_id, index)
            request = asyncio.create_task(self._run_line(batch_id, line))
            in_flight = self._in_flight[batch_id]
            in_flight.add(request)
            try:
                return await request
            except asyncio.CancelledError:
                if request.cancelled() and not _current_task_cancelling():
                    return None  # this line was cancelled with its batch
                raise
            finally:
                in_flight.discard(request)
        finally:
            if not self._stopping:  # a stop leaves it for stop() to refund
                self._charged.discard(key)

    async def _fail_spent_lines(self, batch_id: str, spent: list[PendingLine]) -> None:
        """Lines the engine died on MAX_LINE_ATTEMPTS times: recorded as failed, never sent again."""
        results = []
        for p in spent:
            line = await asyncio.to_thread(self.store.get_line, batch_id, p.index)
            logger.warning("batch %s line %d: the engine died %d times while running it; recorded as failed",
                           batch_id, p.index, p.attempts)
            results.append(engine_failure_line(batch_id, p.index, line.custom_id, p.attempts))
        if results:
            await asyncio.to_thread(self.store.record_results, batch_id, results)

    async def _expire(self, batch: BatchRecord) -> None:
        pending = await asyncio.to_thread(self.store.pending_lines, batch.id)
        results = []
        for p in pending:
            line = await asyncio.to_thread(self.store.get_line, batch.id, p.index)
            results.append(expired_line(batch.id, p.index, line.custom_id))
        await asyncio.to_thread(self.store.record_results, batch.id, results)
        await self._finalize(batch.id, ("in_progress",), "expired")

    async def _finalize(self, batch_id: str, from_statuses: tuple[str, ...], to_status: str) -> None:
        await asyncio.to_thread(self._write_files_and_finish, batch_id, from_statuses, to_status)

    def _write_files_and_finish(self, batch_id: str, from_statuses: tuple[str, ...], to_status: str) -> None:
        """Build output and error files from the result rows (idempotent: the file ids are drawn
        once and kept, so a crash mid-finalize just writes them again), then set the final status."""
        names = {True: "output", False: "error"}
        ids = dict(zip((True, False), self.store.result_file_ids(batch_id), strict=True))
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
        if self.priority is not None:  # never ahead of interactive requests, and within the clients' range
            given = body.get("priority")
            given = given if isinstance(given, int) and not isinstance(given, bool) else self.priority
            body["priority"] = self.limits.client_priority_range.clamp(max(given, self.priority))
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
