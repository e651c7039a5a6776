"""A batch's lines, sent through the server's own app: in which order, how each send is
counted, and which answers are recorded.

Each line is POSTed through the server's own ASGI app in-process, so it gets the interactive
path's validation, steering translation, admission, echo and error objects (no second code
path), and shares the engine with interactive traffic: at most `concurrency` lines in flight,
and `priority` 1 (served after interactive requests) when the engine schedules by priority.

A line is done when its result row is committed. Answers that are not the line's real answer
are never recorded: anything produced while the server shuts down, a 5xx while the engine is
dead, or a choice the engine aborted. Those lines stay pending and run again.

Lines are claimed from the database one at a time (Store.claim_line): each with a lease this
runner renews every LEASE_SECONDS / 3 while it works on the batch, so the runners of several
replicas share a batch's lines, and the lines of a runner that dies are claimed again by the others
once their leases pass. An answer is recorded only while the lease is still this runner's.

Poison pills: every send of a line is counted in the database before it goes out (the claim
counts it), so after a crash (even kill -9) the lines that were in flight are known. They run first, one at a time
with nothing else in flight, so a line that merely shared a crash is cleared and the line that
causes it is caught alone; a line the engine died on MAX_LINE_ATTEMPTS times is recorded as
failed (`engine_failure`) instead of crashing the engine again at every start. A clean stop
does not count against the lines it interrupts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from steerserve.errors import APIError
from steerserve.limits import Limits
from steerserve.batch.lines import engine_failure_line, line_id, response_record
from steerserve.batch.records import InputLine, LineResult, PendingLine
from steerserve.batch.store import Store

logger = logging.getLogger("vllm.steerserve.batch")  # under vLLM's configured "vllm" logger

SERVER_ERROR_ATTEMPTS = 3  # a line whose 5xx repeats this often (engine healthy) is recorded as failed
MAX_LINE_ATTEMPTS = 3  # sends of one line that ended with the engine or server dead: then it fails
LEASE_SECONDS = 30.0  # a claimed line's lease (--batch-lease-seconds); renewed every third of it
_ANY_ATTEMPTS = 1 << 30


def runner_name() -> str:
    """This runner's name in line leases: unique per process and start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LineExecutor:
    """Runs the pending lines of the one batch being executed (BatchService picks which)."""

    def __init__(self, store: Store, client: httpx.AsyncClient, *, concurrency: int, priority: int | None,
                 limits: Limits, engine_dead: Callable[[], bool], stopping: Callable[[], bool],
                 lease_seconds: float = LEASE_SECONDS):
        self.store = store
        self.owner = runner_name()
        self.lease_seconds = lease_seconds
        self.concurrency = concurrency
        self.priority = priority
        self.limits = limits
        self._client = client
        self._engine_dead = engine_dead
        self._stopping = stopping  # the service is stopping: nothing more is sent or recorded
        self.charged: set[tuple[str, int]] = set()  # (batch id, line) sent, attempt counted, no answer yet
        self._in_flight: dict[str, set[asyncio.Task]] = {}  # batch id -> running line requests
        self._cancel_requested: set[str] = set()  # batches whose workers must take no new line

    async def run(self, batch_id: str) -> None:
        """Each line this runner can claim, once: the spent ones failed, the suspects alone, then
        the rest. Lines leased by other runners are theirs; the caller sees them still pending."""
        self._in_flight[batch_id] = set()
        heartbeat = asyncio.create_task(self._renew_leases())
        try:
            await self._fail_spent_lines(batch_id)
            await self._run_lines(batch_id, (1, MAX_LINE_ATTEMPTS), width=1)  # alone: see the module docstring
            await self._run_lines(batch_id, (0, 1), self.concurrency)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            del self._in_flight[batch_id]
            self._cancel_requested.discard(batch_id)

    async def _renew_leases(self) -> None:
        """Keep the leases of the lines in flight alive (a failed renewal is retried: the lease is
        three times as long as the pause, and a lost one only means another runner takes over)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await asyncio.to_thread(self.store.renew_leases, self.owner, list(self.charged), self.lease_seconds)
            except Exception as exc:
                logger.warning("batches: could not renew this runner's line leases: %r", exc)

    async def _claim(self, batch_id: str, attempts: tuple[int, int]) -> PendingLine | None:
        if not self._may_send(batch_id):
            return None
        return await asyncio.to_thread(self.store.claim_line, batch_id, self.owner, self.lease_seconds, attempts)

    def cancel(self, batch_id: str) -> None:
        """No new line of the batch is sent and those in flight are cancelled (they stay pending)."""
        self._cancel_requested.add(batch_id)
        for task in self._in_flight.get(batch_id, ()):
            task.cancel()

    async def _run_lines(self, batch_id: str, attempts: tuple[int, int], width: int) -> None:
        workers = [asyncio.create_task(self._worker(batch_id, attempts)) for _ in range(width)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _may_send(self, batch_id: str) -> bool:
        """No line goes to a dead engine: it could not answer, and the send would count against it."""
        return not (self._stopping() or self._engine_dead() or batch_id in self._cancel_requested)

    async def _worker(self, batch_id: str, attempts: tuple[int, int]) -> None:
        while (claimed := await self._claim(batch_id, attempts)) is not None:
            self.charged.add((batch_id, claimed.index))  # claimed, attempt counted: from here on a clean stop refunds it
            result = await self._attempt(batch_id, claimed.index)
            if result is None or self._stopping():
                return  # no real answer (batch cancelled, engine down or going down): the line stays pending
            await asyncio.to_thread(self.store.record_results, batch_id, [result], self.owner)

    async def _attempt(self, batch_id: str, index: int) -> LineResult | None:
        """Send the claimed line once; None when there is no answer to record."""
        line = await asyncio.to_thread(self.store.get_line, batch_id, index)
        key = (batch_id, index)
        try:
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
            if not self._stopping():  # a stop leaves it for BatchService.stop to refund
                self.charged.discard(key)

    async def _fail_spent_lines(self, batch_id: str) -> None:
        """Lines the engine died on MAX_LINE_ATTEMPTS times: recorded as failed, never sent again."""
        while (p := await self._claim(batch_id, (MAX_LINE_ATTEMPTS, _ANY_ATTEMPTS))) is not None:
            line = await asyncio.to_thread(self.store.get_line, batch_id, p.index)
            logger.warning("batch %s line %d: the engine died %d times while running it; recorded as failed",
                           batch_id, p.index, p.attempts)
            result = engine_failure_line(batch_id, p.index, line.custom_id, p.attempts)
            await asyncio.to_thread(self.store.record_results, batch_id, [result], self.owner)

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
            if self._stopping() or self._engine_dead():
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
