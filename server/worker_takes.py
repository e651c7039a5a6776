"""Taking what the workers keep for a finished request (an inspect capture, a trace, a gated
spec's report), many requests per RPC.

The engine core serves each collective RPC between two steps, with every worker answering, so
one RPC per response (40-50 a second for short gated responses on the CPU default) puts as many
pauses into the step loop. Takes asked for while an RPC is in flight wait and all go in the
next one: under load one RPC serves a whole wave of finishing requests, and a take asked for
alone goes at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sae_plugins.worker_extension import TAKE_STORES

from .engine_rpc import every_rank

TAKE_METHOD = "steerserve_take"

Wanted = tuple[str, str]  # (store, key): see sae_plugins.worker_extension.TAKE_STORES


class WorkerTakes:
    def __init__(self, engine: Any) -> None:
        self._engine = engine  # vLLM's EngineClient
        self._waiting: list[tuple[Wanted, asyncio.Future]] = []
        self._drain: asyncio.Task | None = None
        self.taken_total = 0  # results taken (stream traces take theirs piece by piece)
        self.rpcs_total = 0  # the RPCs that took them

    async def take(self, store: str, key: str) -> list[Any]:
        """One result as every rank returned it (None where a rank holds none)."""
        return (await self.take_many([(store, key)]))[0]

    async def take_many(self, wanted: list[Wanted]) -> list[list[Any]]:
        """Per wanted (store, key), its result per rank; all of them go in one RPC."""
        if any(store not in TAKE_STORES for store, _ in wanted):
            raise ValueError(f"unknown worker store in {wanted}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in wanted]
        self._waiting.extend(zip(wanted, futures))
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._take_waiting())
        return list(await asyncio.gather(*futures))

    async def _take_waiting(self) -> None:
        while self._waiting:
            batch: list[tuple[Wanted, asyncio.Future]] = []
            later: list[tuple[Wanted, asyncio.Future]] = []
            seen: set[Wanted] = set()
            for item in self._waiting:  # a key asked for twice is taken twice, in order
                (later if item[0] in seen else batch).append(item)
                seen.add(item[0])
            self._waiting = later
            self.rpcs_total += 1
            self.taken_total += len(batch)
            try:
                # Every data-parallel engine: the request ran on one of them (server/engine_rpc.py).
                per_rank = await every_rank(self._engine, TAKE_METHOD, ([w for w, _ in batch],))
            except asyncio.CancelledError:
                # The drain itself was cancelled (shutdown): nobody may wait forever for it.
                for _, future in [*batch, *self._waiting]:
                    if not future.done():
                        future.cancel()
                self._waiting = []
                raise
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the engine's error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for n, (_, future) in enumerate(batch):
                if not future.done():  # a caller that went away left its result behind
                    future.set_result([rank[n] if rank else None for rank in per_rank])
