"""Taking what the workers keep for a finished request (an inspect capture, a trace, a gated
spec's report), many requests per RPC.

The engine core serves each collective RPC between two steps, with every worker answering, so
one RPC per response (40-50 a second for short gated responses on the CPU default) puts as many
pauses into the step loop. Takes asked for while an RPC is in flight wait and all go in the
next one: under load one RPC serves a whole wave of finishing requests, and a take asked for
alone goes at once.

Every result a request asked the workers to keep is taken, read or not: `discard` names, in the
same coalesced RPCs, what a response will not read (its client went away, its status was an
error, it was cancelled), so the workers' store (sae_plugins/steerserve_sae/capture/store.py) frees it at once
and drops what the request may still record.
A result that outgrew the workers' store budget is taken as the store's marker and raised to
its caller as a 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

from steerserve_sae.protocol.rpc import TAKE, TAKE_STORES, Wanted, store_full_reason

from steerserve.engine_rpc import every_rank
from steerserve.errors import APIError


class WorkerTakes:
    def __init__(self, engine: Any) -> None:
        self._engine = engine  # vLLM's EngineClient
        self._waiting: list[tuple[Wanted, asyncio.Future | None]] = []  # None: a discard, nobody waits
        self._drain: asyncio.Task | None = None
        self.taken_total = 0  # results taken (stream traces take theirs piece by piece)
        self.rpcs_total = 0  # the RPCs that took them
        self.discarded_total = 0  # results taken only to free them (responses that did not read them)

    async def take(self, store: str, key: str) -> list[Any]:
        """One result as every rank returned it (None where a rank holds none)."""
        return (await self.take_many([(store, key)]))[0]

    async def take_many(self, wanted: list[Wanted]) -> list[list[Any]]:
        """Per wanted (store, key), its result per rank; all of them go in one RPC."""
        if any(store not in TAKE_STORES for store, _ in wanted):
            raise ValueError(f"unknown worker store in {wanted}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in wanted]
        self._queue(list(zip(wanted, futures)))
        return list(await asyncio.gather(*futures))

    def discard(self, wanted: list[Wanted]) -> None:
        """Take these results and drop them, without waiting (safe in a `finally`, even a cancelled one's)."""
        if any(store not in TAKE_STORES for store, _ in wanted):
            raise ValueError(f"unknown worker store in {wanted}")
        self.discarded_total += len(wanted)
        self._queue([(w, None) for w in wanted])

    def _queue(self, items: list[tuple[Wanted, asyncio.Future | None]]) -> None:
        self._waiting.extend(items)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_task(self._take_waiting())

    async def _take_waiting(self) -> None:
        while self._waiting:
            batch: list[tuple[Wanted, asyncio.Future | None]] = []
            later: list[tuple[Wanted, asyncio.Future | None]] = []
            seen: set[Wanted] = set()
            for item in self._waiting:  # a key asked for twice is taken twice, in order
                (later if item[0] in seen else batch).append(item)
                seen.add(item[0])
            self._waiting = later
            self.rpcs_total += 1
            self.taken_total += len(batch)
            try:
                # Every data-parallel engine: the request ran on one of them (server/steerserve/engine_rpc.py).
                taken = [w for w, future in batch if future is not None]
                dropped = [w for w, future in batch if future is None]
                per_rank = await every_rank(self._engine, TAKE, (taken, dropped) if dropped else (taken,))
            except asyncio.CancelledError:
                # The drain itself was cancelled (shutdown): nobody may wait forever for it.
                for _, future in [*batch, *self._waiting]:
                    if future is not None and not future.done():
                        future.cancel()
                self._waiting = []
                raise
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the engine's error
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(exc)
                continue
            for n, future in enumerate(future for _, future in batch if future is not None):
                if future.done():  # a caller that went away left its result behind
                    continue
                results = [rank[n] if rank else None for rank in per_rank]
                full = store_full_reason(results)
                if full is not None:
                    future.set_exception(store_full_error(full))
                else:
                    future.set_result(results)


def store_full_error(reason: str) -> APIError:
    return APIError(f"{reason}; retry later, or ask for less (fewer layers or positions, no residuals)",
                    code="worker_store_full", status=503, type="server_error")
