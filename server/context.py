"""What the HTTP layer knows about the steering engine, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_admission import ConfigAdmission
from .metrics import SteeringMetrics


@dataclass
class SteeringContext:
    saes: list[dict]  # per loaded layer, as reported by the workers (GET /v1/saes)
    max_features: int
    admission: ConfigAdmission
    metrics: SteeringMetrics = field(default_factory=SteeringMetrics)

    @property
    def sae_sizes(self) -> dict[int, int]:
        return {info["layer"]: info["d_sae"] for info in self.saes}
