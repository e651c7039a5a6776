"""Methods mixed into every vLLM worker (`--worker-extension-cls`), reached by collective RPC.

This is the plugin's whole surface towards the API process: the HTTP layer asks what is
loaded and for counters, never touching worker internals itself.
"""

from __future__ import annotations

from .runner_patch import current_runtime


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
            "sae_memory_bytes": {layer: sae.nbytes() for layer, sae in sorted(runtime.saes.items())},
            "sae_layers": sorted(runtime.saes),
        }


WORKER_EXTENSION_CLS = f"{__name__}.{SteeringWorkerExtension.__name__}"
