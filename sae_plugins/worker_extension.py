"""Methods mixed into every vLLM worker (`--worker-extension-cls`), reached by collective RPC.

This is the plugin's whole surface towards the API process: the HTTP layer asks what is
loaded and for counters, never touching worker internals itself.
"""

from __future__ import annotations

from . import registry
from .feature_capture import trace_key


class SteeringWorkerExtension:
    def steerserve_sae_info(self) -> list[dict]:
        runtime = registry.runtime()
        return runtime.sae_info() if runtime is not None else []

    def steerserve_stats(self) -> dict:
        runtime = registry.runtime()
        return runtime.stats() if runtime is not None else {}

    def steerserve_take_capture(self, capture_id: str) -> dict | None:
        runtime = registry.runtime()
        return runtime.captures.take(capture_id) if runtime is not None else None

    def steerserve_take_trace(self, capture_id: str, choices: int) -> dict[int, dict] | None:
        """Per choice (0 .. choices - 1), the trace recorded under trace_key (missing: none)."""
        runtime = registry.runtime()
        if runtime is None:
            return None
        taken = {choice: runtime.captures.take(trace_key(capture_id, choice)) for choice in range(choices)}
        return {choice: result for choice, result in taken.items() if result is not None}

    def steerserve_take_gate_report(self, report_id: str) -> dict | None:
        runtime = registry.runtime()
        return runtime.gate_reports.take(report_id) if runtime is not None else None

    def steerserve_feature_report(self, layer: int, index: int, top_n: int) -> dict | None:
        lens = registry.lens()
        return lens.feature_report(layer, index, top_n) if lens is not None and layer in lens.saes else None

    def steerserve_token_features(self, token_id: int, layers: list[int], top_n: int) -> dict | None:
        lens = registry.lens()
        local = [layer for layer in layers if lens is not None and layer in lens.saes]
        return lens.token_scores(token_id, local, top_n) if local else None


WORKER_EXTENSION_CLS = f"{__name__}.{SteeringWorkerExtension.__name__}"
