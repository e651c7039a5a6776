"""Wiring of the Files + Batches API into vLLM's app (called from server/steerserve/endpoint_plugin.py).

`attach_batch_api` runs while vLLM builds the app: routes, and a lifespan wrapper that stops
the runner when the server stops. `start_batch_service` runs from the plugin's `init_state`,
inside the server's event loop once the engine is up: it opens the store and starts the runner
task (held by the service, which is held by app.state, so it is never garbage-collected).
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from steerserve.errors import answer_api_errors
from steerserve.in_process import server_api_key
from steerserve.limits import Limits
from steerserve.batch.batches_api import router as batches_router
from steerserve.batch.files_api import router as files_router
from steerserve.batch.identity import RunnerLock, server_identity
from steerserve.batch.line_executor import LEASE_SECONDS
from steerserve.batch.runner import BatchService
from steerserve.batch.store import Store
from steerserve.db import is_shared

logger = logging.getLogger("vllm.steerserve.batch")  # under vLLM's configured "vllm" logger

# The defaults of `steerserve serve --data-dir` and `--batch-concurrency` (cli.py reads them here).
DEFAULT_DATA_DIR = ".state/data"
DEFAULT_BATCH_CONCURRENCY = 4
BATCH_PRIORITY = 1  # vLLM serves lower numbers first; interactive requests default to 0


def attach_batch_api(app: FastAPI) -> None:
    answer_api_errors(app)
    app.include_router(files_router)
    app.include_router(batches_router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any):
        async with inner(a) as value:
            try:
                yield value
            finally:
                service = getattr(a.state, "steerserve_batches", None)
                if service is not None:
                    await service.stop()

    app.router.lifespan_context = lifespan


def start_batch_service(app: FastAPI, engine_client: Any, state: Any, args: Namespace) -> BatchService:
    data_dir = os.path.abspath(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR)
    database_url = getattr(args, "database_url", None)
    identity = server_identity(args)
    if not is_shared(database_url):  # a shared database has no runner lock: runners claim lines
        RunnerLock(data_dir).refuse_other_holder(identity)  # before anything is opened (serve.py checked it too)
    store = Store(data_dir, database_url)
    priority = BATCH_PRIORITY if getattr(args, "scheduling_policy", "fcfs") == "priority" else None
    service = BatchService(
        store, app,
        concurrency=getattr(args, "batch_concurrency", None) or DEFAULT_BATCH_CONCURRENCY,
        priority=priority,
        api_key=server_api_key(args),
        engine_dead=lambda: bool(getattr(engine_client, "errored", False)),
        limits=Limits.from_args(args),
        identity=identity,
        lease_seconds=getattr(args, "batch_lease_seconds", None) or LEASE_SECONDS,
    )
    state.steerserve_batches = service
    _stop_recording_before_engine_shutdown(engine_client, service)
    running = service.start()
    logger.info("batches: data in %s, %s, %s, server identity %s (%s), concurrency %d, priority %s, uploads up to "
                "%d bytes, batches up to %d lines", "the shared database" if store.shared else store.data_dir,
                f"line leases of {service._lines.lease_seconds:g} s",
                "runner started" if running else "runner held by another process",
                service.identity.key, service.identity.description,
                service.concurrency, priority, service.limits.max_upload_bytes, service.limits.max_batch_lines)
    return service


def _stop_recording_before_engine_shutdown(engine_client: Any, service: BatchService) -> None:
    """vLLM stops the engine (aborting what runs) before the app's lifespan ends; a batch line
    answered during that window must not count as done. Wrapping the client's shutdown is the
    one hook that runs first."""
    original = getattr(engine_client, "shutdown", None)
    if original is None:
        return

    def shutdown(*args: Any, **kwargs: Any) -> Any:
        service.begin_shutdown()
        return original(*args, **kwargs)

    try:
        engine_client.shutdown = shutdown
    except AttributeError:
        logger.warning("batches: cannot hook engine shutdown; relying on abort detection")
