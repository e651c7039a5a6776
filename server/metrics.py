"""Steering counters exported on vLLM's own `/metrics` (the process-wide Prometheus registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge


class SteeringMetrics:
    """Created once per API process (prometheus metric names are global)."""

    _instance: "SteeringMetrics | None" = None

    def __new__(cls):
        if cls._instance is None:
            self = super().__new__(cls)
            self.requests = Counter("steerserve_steered_requests", "Steered requests accepted")
            self.errors = Counter(
                "steerserve_steering_validation_errors", "Rejected steering specs", ["reason"]
            )
            self.active_configs = Gauge("steerserve_active_steering_configs", "Distinct steering specs in flight")
            self.config_waits = Gauge("steerserve_config_slot_waits", "Requests that waited for a config slot")
            self.sae_layers = Gauge("steerserve_sae_layers_loaded", "SAE layers loaded")
            self.sae_bytes = Gauge("steerserve_sae_memory_bytes", "SAE weight memory per worker", ["layer"])
            cls._instance = self
        return cls._instance

    def steered_request(self) -> None:
        self.requests.inc()

    def validation_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()
