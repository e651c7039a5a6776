"""What the HTTP layer knows about the steering engine, built once at start-up."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from steerserve.steering.admission import ConfigAdmission
from steerserve.analysis.feature_labels import FeatureLabels
from steerserve.limits import Limits
from steerserve.metrics import SteeringMetrics
from steerserve.steering.presets import PresetCheck, PresetStore
from steerserve.steering.vector_store import VectorStore
from steerserve.steering.worker_takes import WorkerTakes
from steerserve.token_search_cache import TokenSearchCache


@dataclass
class SteeringContext:
    saes: list[dict]  # per loaded layer, as reported by the workers (GET /v1/saes)
    max_features: int
    admission: ConfigAdmission
    sae_stages: tuple[frozenset[int], ...] = ()  # the layer sets the workers steer (one per pipeline stage)
    vector_layers: frozenset[int] = frozenset()  # --steering-layers without an SAE: direction vectors only
    hidden_size: int = 0  # the model's residual width, for a server with no SAE to read it from
    engine: Any = None  # vLLM's EngineClient: tokenizer and collective RPC
    takes: WorkerTakes | None = None  # what finished requests left in the workers, taken over that RPC
    client: Any = None  # in-process client of this server's own app (server/steerserve/in_process.py)
    served_model: str = ""
    served_models: tuple[str, ...] = ()  # every name vLLM serves the model under (--served-model-name)
    adapters: Callable[[], Iterable[str]] = tuple  # the LoRA adapters vLLM serves now (their names)
    presets: PresetStore | None = None  # named specs served as models (server/steerserve/steering/presets.py)
    preset_check: PresetCheck | None = None  # which stored presets this server serves
    vectors: VectorStore | None = None  # stored direction vectors (server/steerserve/steering/vector_store.py)
    max_model_len: int = 0
    limits: Limits = field(default_factory=Limits)
    labels: FeatureLabels = field(default_factory=FeatureLabels)
    dashboards: Any = None  # analysis/dashboard_store.DashboardStore from --feature-dashboards
    token_search_cache: TokenSearchCache = field(default_factory=TokenSearchCache)
    metrics: SteeringMetrics = field(default_factory=SteeringMetrics)

    def model_names(self) -> set[str]:
        """Every name a request's `model` reaches a model by: the served model's and each LoRA
        adapter's (a preset may take none of them)."""
        return {*self.served_models, *self.adapters()}

    @property
    def sae_by_layer(self) -> dict[int, dict]:
        return {info["layer"]: info for info in self.saes}

    @property
    def d_model(self) -> int:
        """The residual stream's width (every SAE reads the same stream); the model's hidden
        size without SAEs (0 when unknown)."""
        return self.saes[0]["d_model"] if self.saes else self.hidden_size

    @property
    def sae_sizes(self) -> dict[int, int]:
        return {info["layer"]: info["d_sae"] for info in self.saes}
