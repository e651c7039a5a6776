"""Collective RPCs that reach the workers of every data-parallel engine.

vLLM's `EngineClient.collective_rpc` goes through its engine-core client's `call_utility_async`,
which with data parallelism (vLLM 0.32's DP load-balancing client) sends the call to every
engine but returns engine 0's reply only. A take deletes what it reads, so a trace, gate report
or inspect capture left by a request that ran on engine 1 would be taken there and dropped. These
helpers ask every engine and keep every reply; without data parallelism there is one engine and
they return what `collective_rpc` does.
"""

from __future__ import annotations

from typing import Any


async def per_engine(engine: Any, method: str, args: tuple = ()) -> list[list[Any]]:
    """Per engine (in rank order), its workers' replies (one per rank)."""
    core = getattr(engine, "engine_core", None)
    call_all = getattr(core, "call_utility_all_async", None)
    if call_all is None:  # an engine client without vLLM's multiprocess core: one engine
        return [await engine.collective_rpc(method, args=args)]
    return list(await call_all("collective_rpc", method, None, args, None))


async def every_rank(engine: Any, method: str, args: tuple = ()) -> list[Any]:
    """Every worker's reply, engine by engine."""
    return [reply for replies in await per_engine(engine, method, args) for reply in replies]
