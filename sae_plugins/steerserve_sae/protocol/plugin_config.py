"""Plugin settings, carried to every worker inside vLLM's `additional_config`.

`additional_config` is part of the VllmConfig every worker receives (also across Ray nodes) and
is hashed into vLLM's compile cache key, so a different SAE layer set never reuses a graph
compiled without it. The API process reads it too (the limits it admits requests by), so it
is part of the protocol and torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ADDITIONAL_CONFIG_KEY = "steerserve"
DEFAULT_MAX_FEATURES = 64
DEFAULT_MAX_CONFIGS = 64
DEFAULT_MAX_STORE_MIB = 1024  # --max-worker-store-mib (capture/store.py)
DEFAULT_MAX_VECTORS = 8
# The steering op (--steering-kernel): auto/native/torch pick between the native CPU kernel and
# the PyTorch op (backends/native_cpu.py); triton selects the experimental GPU kernels (backends/triton.py).
STEERING_KERNELS = ("auto", "native", "torch", "triton")


@dataclass(frozen=True)
class PluginConfig:
    sae_path: str  # "" when only --steering-layers were given (no SAE)
    sae_layers: tuple[int, ...]
    sae_name: str | None = None  # what a Qwen-Scope set's width and k are read from (sae/loading.py, qwen_scope_k)
    sae_k: int | None = None  # --sae-k
    sae_hub_url: str | None = None  # hf://owner/name@<commit> when --sae was a hub id (SAESource.hub_url)
    max_features: int = DEFAULT_MAX_FEATURES  # per request, over all layers
    max_configs: int = DEFAULT_MAX_CONFIGS  # distinct steering specs in flight
    max_vectors: int = DEFAULT_MAX_VECTORS  # direction vectors per request (--max-steering-vectors)
    steering_kernel: str = "auto"  # one of STEERING_KERNELS
    api_servers: int = 1  # API processes, each admitting up to max_configs specs
    max_store_mib: int = DEFAULT_MAX_STORE_MIB  # --max-worker-store-mib: results kept for the API (capture/store.py)
    steering_layers: tuple[int, ...] = ()  # --steering-layers: direction vectors may steer here without an SAE

    @property
    def vector_only_layers(self) -> tuple[int, ...]:
        """Layers steered by direction vectors only (no SAE: no features, gates or captures)."""
        return tuple(sorted(set(self.steering_layers) - set(self.sae_layers)))

    @property
    def vector_layers(self) -> tuple[int, ...]:
        """Every layer a direction vector may steer: the SAE layers and the --steering-layers."""
        return tuple(sorted(set(self.sae_layers) | set(self.steering_layers)))

    @property
    def num_slots(self) -> int:
        """Config slots per worker: every API process's admitted specs, plus as many again of
        headroom for aborts racing new requests, plus the reserved slot 0 (config_slots.py)."""
        return (self.api_servers + 1) * self.max_configs + 1

    @property
    def max_store_bytes(self) -> int:
        return self.max_store_mib * 2**20

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sae_layers"] = list(self.sae_layers)
        d["steering_layers"] = list(self.steering_layers)
        return d

    @staticmethod
    def from_additional_config(additional_config: Any) -> "PluginConfig | None":
        if not isinstance(additional_config, dict):
            return None
        raw = additional_config.get(ADDITIONAL_CONFIG_KEY)
        if not raw:
            return None
        return PluginConfig(
            sae_path=str(raw.get("sae_path") or ""),
            sae_layers=tuple(int(x) for x in raw["sae_layers"]),
            sae_name=raw.get("sae_name"),
            sae_k=raw.get("sae_k"),
            sae_hub_url=raw.get("sae_hub_url"),
            max_features=int(raw.get("max_features", DEFAULT_MAX_FEATURES)),
            max_configs=int(raw.get("max_configs", DEFAULT_MAX_CONFIGS)),
            max_vectors=int(raw.get("max_vectors", DEFAULT_MAX_VECTORS)),
            steering_kernel=str(raw.get("steering_kernel", "auto")),
            api_servers=int(raw.get("api_servers", 1)),
            max_store_mib=int(raw.get("max_store_mib", DEFAULT_MAX_STORE_MIB)),
            steering_layers=tuple(int(x) for x in raw.get("steering_layers", ())),
        )
