"""Methods mixed into every vLLM worker (`--worker-extension-cls`), reached by collective RPC.

This is the plugin's whole surface towards the API process: the HTTP layer asks what is
loaded and for counters, never touching worker internals itself. The methods are those
protocol/rpc.py names (rpc.METHODS), and reply with its types.
"""

from __future__ import annotations

from steerserve_sae.protocol import signing
from steerserve_sae.protocol.rpc import CAPTURES, GATE_REPORTS, REJECTIONS, TAKE_STORES, FeatureReport, SAEInfo, \
    TokenFeatures, Wanted, WorkerStats
from steerserve_sae.steering import registry


class SteeringWorkerExtension:
    def steerserve_sae_info(self) -> list[SAEInfo]:
        runtime = registry.runtime()
        return runtime.sae_info() if runtime is not None else []

    def steerserve_stats(self) -> WorkerStats:
        runtime = registry.runtime()
        return runtime.stats() if runtime is not None else {}

    def steerserve_take(self, wanted: list[Wanted], discarded: list[Wanted] = ()) -> list:
        """What finished requests left behind, many in one RPC (each RPC pauses the engine's step
        loop, so the API coalesces them): per (store, key), the result taken from that store
        (TAKE_STORES), or None if it holds none. `discarded`: what the API will not read (a client
        gone, an error, a cancellation), freed now and not recorded from now on (capture/store.py)."""
        runtime = registry.runtime()
        if any(store not in TAKE_STORES for store, _ in [*wanted, *discarded]):
            raise ValueError(f"steerserve_take: stores are {TAKE_STORES}")
        if runtime is None:
            return [None] * len(wanted)
        for store, key in discarded:
            runtime.store.discard((store, key))
        stores = {CAPTURES: runtime.captures, GATE_REPORTS: runtime.gate_reports, REJECTIONS: runtime.rejections}
        return [stores[store].take(key) for store, key in wanted]

    def steerserve_verify_signature(self, signed: str) -> str | None:
        """None if this worker verifies a value the API signed; else why not (asked once at
        start-up, so a worker without the deployment's secret is reported before any request)."""
        try:
            signing.verify(signed)
        except signing.SignatureError as exc:
            return str(exc)
        return None

    def steerserve_feature_report(self, layer: int, index: int, top_n: int) -> FeatureReport | None:
        lens = registry.lens()
        return lens.feature_report(layer, index, top_n) if lens is not None and layer in lens.saes else None

    def steerserve_token_features(self, token_id: int, layers: list[int], top_n: int) -> TokenFeatures | None:
        lens = registry.lens()
        local = [layer for layer in layers if lens is not None and layer in lens.saes]
        return lens.token_scores(token_id, local, top_n) if local else None


WORKER_EXTENSION_CLS = f"{__name__}.{SteeringWorkerExtension.__name__}"
