"""The batch executor: a reconciler that drives every unfinished batch to its next state.

The database is the truth; this class only holds tasks. Every second (and at once when an
endpoint wakes it) it reads the unfinished batches and starts what each needs: validation for
`validating`, execution for the oldest `in_progress`, finalize for `finalizing` and
`cancelling`. After a restart the same loop resumes whatever a crash left behind.

Which lines run, in which order, and which answers are recorded: line_executor.py.

No input spins the loop: a batch's task (validation, execution, finalize) that raises is retried
after a pause that doubles each time (TASK_RETRY_PAUSE up to TASK_RETRY_MAX), and after
MAX_TASK_FAILURES in a row the batch is failed with the error, instead of being retried as fast
as the loop turns; the log says each failure once, and repeats of the reconciler's own failures
at most once per LOG_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from steerserve.db import UNAVAILABLE
from steerserve.errors import APIError
from steerserve.in_process import in_process_client
from steerserve.limits import Limits
from steerserve.batch.identity import RunnerLock, ServerIdentity
from steerserve.batch.line_executor import LEASE_SECONDS, LineExecutor
from steerserve.batch.lines import expired_line, parse_input
from steerserve.batch.records import BatchRecord, FileRecord, now
from steerserve.batch.store import Store

logger = logging.getLogger("vllm.steerserve.batch")  # under vLLM's configured "vllm" logger

POLL_SECONDS = 1.0
RETRY_PAUSE = 5.0  # after a pass that left lines pending (engine trouble), before the next pass
TASK_RETRY_PAUSE = 1.0  # after a batch's task raised; doubled at each failure in a row
TASK_RETRY_MAX = 300.0
MAX_TASK_FAILURES = 5  # failures in a row of a batch's task: then the batch fails
DATABASE_RETRY = 2.0  # seconds between tries of a batch's task while the shared database is unreachable
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
        identity: ServerIdentity,
        lease_seconds: float = LEASE_SECONDS,
    ):
        self.store = store
        self.identity = identity  # batches created here are stamped with it; the runner claims only those
        self.limits = limits  # the routes read the upload and line limits here
        self.concurrency = max(1, concurrency)
        self._engine_dead = engine_dead
        self._client = in_process_client(app, api_key)
        self._lines = LineExecutor(store, self._client, concurrency=self.concurrency, priority=priority,
                                   limits=limits, engine_dead=engine_dead, stopping=lambda: self._stopping,
                                   lease_seconds=lease_seconds)
        self._wake = asyncio.Event()
        self._stopping = False
        self._clean_stop = False  # the engine was healthy when the stop began
        self._loop_task: asyncio.Task | None = None
        self._busy: dict[str, asyncio.Task] = {}  # batch id -> the task handling it (strong refs)
        self._not_before: dict[str, float] = {}  # batch id -> loop time of its next pass
        self._failures: dict[str, tuple[int, str]] = {}  # batch id -> (its task's failures in a row, the last)
        self._logged_at: dict[str, tuple[float, int]] = {}  # repeated failure -> (last logged, dropped since)
        self._executing: str | None = None  # the one batch whose lines run now
        self._lock = RunnerLock(store.data_dir)
        self._skipped: set[str] = set()  # batches of other servers, logged once each

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        """Start the reconciler unless another process already runs batches from this data dir.

        With SQLite and several API processes (`--api-server-count`) of one server, only the
        holder of the lock executes; the others still serve the API from the same database. A
        runner of another server holding it is DataDirInUse (identity.py): batches accepted here
        would never run. With a shared database (--database-url) every process of every replica
        runs a runner: they claim lines with leases (store.py), and each claims only batches of
        its own identity.
        """
        if self.store.shared:
            self._loop_task = asyncio.get_running_loop().create_task(self._reconcile_forever(),
                                                                     name="steerserve-batches")
            return True
        if not self._lock.acquire(self.identity):
            self._lock.refuse_other_holder(self.identity)
            logger.warning("another process of this server runs the batches of %s; this one only serves the API",
                           self.store.data_dir)
            return False
        self.store.drop_leases()  # the lock holder is the data dir's only runner: leases left are a dead one's
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
        if self._clean_stop and self._lines.charged:
            await asyncio.to_thread(self.store.refund_attempts, list(self._lines.charged))
        await self._client.aclose()
        self._lock.release()
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
            if not self._claims(batch):
                continue
            stop_lines = batch.status == "cancelling" or (batch.status == "in_progress" and _expired(batch))
            if stop_lines and batch.id == self._executing:
                self._lines.cancel(batch.id)  # _execute then finalizes the batch as cancelled or expired
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

    def _claims(self, batch: BatchRecord) -> bool:
        """Only batches this server accepted (or from before batches were stamped); another
        server's are left for its runner, and logged once."""
        if batch.server_id is None or batch.server_id == self.identity.key:
            return True
        if batch.id not in self._skipped:
            self._skipped.add(batch.id)
            logger.warning("batch %s (%s) was accepted by another server (identity %s); this runner (identity %s: "
                           "%s) leaves it to that server's runner", batch.id, batch.status, batch.server_id,
                           self.identity.key, self.identity.description)
        return False

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
        fails it once MAX_TASK_FAILURES is reached. The shared database being unreachable is not
        the batch's failure: it is retried every DATABASE_RETRY seconds, as long as that lasts."""
        if isinstance(exc, APIError) and exc.code == UNAVAILABLE:
            self._not_before[batch_id] = asyncio.get_running_loop().time() + DATABASE_RETRY
            self._log_throttled("database", "batch %s: waiting for the database: %s", batch_id, exc.message)
            return
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
        data = await asyncio.to_thread(self.store.contents.read_all, batch.input_file_id)
        parsed = await asyncio.to_thread(parse_input, data, batch.id, batch.endpoint, self.limits.max_batch_lines)
        if parsed.errors:
            await asyncio.to_thread(self.store.transition, batch.id, ("validating",), "failed",
                                    errors=parsed.errors, failed_at=now())
        else:
            await asyncio.to_thread(self.store.save_validation, batch.id, parsed.lines, parsed.early_results)

    async def _execute(self, batch: BatchRecord) -> None:
        await self._lines.run(batch.id)
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
        current = self.store.get_batch(batch_id)
        if current is None or current.status not in from_statuses:  # another replica finalized it
            return
        names = {True: "output", False: "error"}
        ids = dict(zip((True, False), self.store.result_file_ids(batch_id), strict=True))
        contents = self.store.contents
        tmp = {ok: contents.scratch(ids[ok]) for ok in names}
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
                contents.adopt(ids[ok], tmp[ok])
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


def _expired(batch: BatchRecord) -> bool:
    return batch.expires_at is not None and now() >= batch.expires_at
