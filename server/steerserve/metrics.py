"""Steering metrics on vLLM's own `/metrics` (the process-wide Prometheus registry).

API-side numbers (requests, validation errors, config admission) are counted where they happen.
Worker-side numbers (steered tokens, SAE memory) live in the workers; they are fetched over
collective RPC after steered requests finish, at most once per `REFRESH_SECONDS`, and served
from that snapshot, so a scrape never waits on the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# A child of vLLM's logger, so our lines go out through the handler vLLM configures.
logger = logging.getLogger("vllm.steerserve")
REFRESH_SECONDS = 1.0


class SteeringMetrics:
    """One per API process (Prometheus metric names are global)."""

    _instance: "SteeringMetrics | None" = None

    def __new__(cls):
        if cls._instance is None:
            self = super().__new__(cls)
            self.requests = Counter("steerserve_steered_requests", "Steered requests accepted")
            self.errors = Counter("steerserve_steering_validation_errors", "Rejected steering specs", ["reason"])
            self.worker_stats: dict = {}
            self.admission_active = lambda: 0
            self.admission_waits = lambda: 0
            self.takes = None  # server/steerserve/steering/worker_takes.py's WorkerTakes, once bound
            self._fetch: Callable[[], Awaitable[dict]] | None = None
            self._last_refresh = 0.0
            self._refreshing = False
            REGISTRY.register(_SnapshotCollector(self))
            cls._instance = self
        return cls._instance

    def steered_request(self) -> None:
        self.requests.inc()

    def validation_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()

    def bind(self, fetch_worker_stats, admission, takes) -> None:
        self._fetch = fetch_worker_stats
        self.admission_active = lambda: admission.active
        self.admission_waits = lambda: admission.waits_total
        self.takes = takes

    async def refresh(self) -> None:
        if self._fetch is None or self._refreshing:
            return
        self._refreshing = True
        try:
            await asyncio.sleep(max(0.0, self._last_refresh + REFRESH_SECONDS - time.monotonic()))
            self.worker_stats = await self._fetch()
            self._last_refresh = time.monotonic()
        except Exception as exc:  # metrics must never fail a request (or a shutdown)
            logger.warning("steerserve: could not refresh worker stats: %r", exc)
        finally:
            self._refreshing = False

    def schedule_refresh(self) -> None:
        if not self._refreshing:
            task = asyncio.get_running_loop().create_task(self.refresh())
            _background.add(task)
            task.add_done_callback(_background.discard)


_background: set[asyncio.Task] = set()


class _SnapshotCollector:
    def __init__(self, metrics: SteeringMetrics):
        self.metrics = metrics

    def collect(self):
        stats, metrics = self.metrics.worker_stats, self.metrics
        takes = metrics.takes
        workers = "rank 0 worker of each data-parallel engine, added up"
        for family, name, text, value in (
            (CounterMetricFamily, "steerserve_steered_tokens", f"Token positions steered ({workers})",
             stats.get("steered_tokens_total", 0)),
            (GaugeMetricFamily, "steerserve_active_steering_configs", "Distinct steering specs in flight",
             metrics.admission_active()),
            (CounterMetricFamily, "steerserve_config_slot_waits", "Requests that waited for a config slot",
             metrics.admission_waits()),
            (GaugeMetricFamily, "steerserve_config_slots_in_use", f"Worker config slots holding a spec ({workers})",
             stats.get("active_configs", 0)),
            (CounterMetricFamily, "steerserve_worker_rejected_specs",
             f"Steering/capture specs a worker refused to act on ({workers}; the API never sends one, so anything "
             "above 0 deserves a look at the worker log)", stats.get("rejected_requests_total", 0)),
            (CounterMetricFamily, "steerserve_worker_takes",
             "Results taken from the workers (inspect captures, traces, gate reports, refusals)",
             takes.taken_total if takes else 0),
            (CounterMetricFamily, "steerserve_worker_take_rpcs",
             "Collective RPCs that took them (fewer than the results: coalesced)", takes.rpcs_total if takes else 0),
            (GaugeMetricFamily, "steerserve_worker_store_entries",
             f"Results the workers keep until the API takes them (captures, traces, gate reports, refusals), {workers}",
             stats.get("store_entries", 0)),
            (GaugeMetricFamily, "steerserve_worker_store_bytes",
             f"Estimated host bytes of those results (bounded by --max-worker-store-mib per worker), {workers}",
             stats.get("store_bytes", 0)),
            (CounterMetricFamily, "steerserve_worker_store_full",
             f"Results that outgrew the workers' store (their requests got a 503), {workers}",
             stats.get("store_full_total", 0)),
            (CounterMetricFamily, "steerserve_steering_host_seconds",
             f"Host seconds in steering (per-step routing, the steering op, gate counts), {workers}",
             stats.get("steering_seconds_total", 0.0)),
            (CounterMetricFamily, "steerserve_model_execute_host_seconds",
             f"Host seconds in the model runner's execute_model for real batches, {workers}",
             stats.get("execute_seconds_total", 0.0)),
            (GaugeMetricFamily, "steerserve_sae_layers_loaded", "SAE layers loaded", len(stats.get("sae_layers", []))),
        ):
            one = family(name, text)
            one.add_metric([], value)
            yield one
        memory = GaugeMetricFamily("steerserve_sae_memory_bytes", "SAE weight memory per worker", labels=["layer"])
        for layer, nbytes in stats.get("sae_memory_bytes", {}).items():
            memory.add_metric([str(layer)], nbytes)
        yield memory
        if "steering_kernel" in stats:
            kernel = GaugeMetricFamily("steerserve_steering_kernel", "The steering op in use (1 = this one)",
                                       labels=["kernel"])
            kernel.add_metric([stats["steering_kernel"]], 1)
            yield kernel
