"""Methods mixed into every vLLM worker (`--worker-extension-cls`), reached by collective RPC.

This is the plugin's whole surface towards the API process: the HTTP layer asks what is
loaded and for counters, never touching worker internals itself.
"""

from __future__ import annotations

from .runner_patch import current_lens, current_runtime


class SteeringWorkerExtension:
    def steerserve_sae_info(self) -> list[dict]:
        runtime = current_runtime()
        return runtime.sae_info() if runtime is not None else []

    def steerserve_stats(self) -> dict:
        runtime = current_runtime()
        if runtime is None:
            return {}
        return {
            "steered_tokens_total": runtime.steered_tokens_total,
            "active_configs": runtime.slots.active,
            "rejected_requests_total": runtime.rejected_requests_total,
            "sae_memory_bytes": {layer: sae.nbytes() for layer, sae in sorted(runtime.saes.items())},
            "sae_layers": sorted(runtime.saes),
            "steering_kernel": runtime.kernel_name,
            # Host time (on CPU the real cost; on GPU what it takes to launch the work).
            "steering_seconds_total": runtime.steering_seconds,
            "execute_seconds_total": runtime.execute_seconds,
        }

    def steerserve_take_capture(self, capture_id: str) -> dict | None:
        runtime = current_runtime()
        return runtime.captures.take(capture_id) if runtime is not None else None

    def steerserve_feature_report(self, layer: int, index: int, top_n: int) -> dict | None:
        lens = current_lens()
        return lens.feature_report(layer, index, top_n) if lens is not None and layer in lens.saes else None

    def steerserve_token_features(self, token_id: int, layers: list[int], top_n: int) -> dict | None:
        lens = current_lens()
        local = [layer for layer in layers if lens is not None and layer in lens.saes]
        return lens.token_scores(token_id, local, top_n) if local else None


WORKER_EXTENSION_CLS = f"{__name__}.{SteeringWorkerExtension.__name__}"
