"""The normalised steering spec: what a request asks the SAE step to do.

The HTTP layer validates user JSON into this form; it travels to the workers as one signed JSON
string (request_signing.py) in `SamplingParams.extra_args[EXTRA_ARGS_KEY]` (vLLM only forwards flat str/int/float values),
and the workers decode it back. The id is a hash of the canonical form, so equal specs share a
config slot and a prefix-cache salt however the user ordered them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

from . import request_signing

EXTRA_ARGS_KEY = "steerserve_steering"

Mode = Literal["add", "clamp", "scale", "ablate"]
ApplyTo = Literal["all", "prompt", "generation"]
MODES: tuple[str, ...] = ("add", "clamp", "scale", "ablate")  # what the workers accept
APPLY_TO: tuple[str, ...] = ("all", "prompt", "generation")


@dataclass(frozen=True, order=True)
class FeatureEdit:
    layer: int
    index: int
    mode: Mode
    value: float  # 0.0 for ablate

    @property
    def target(self) -> float:
        """Value used by the clamp-family math (ablate is clamp to 0)."""
        return 0.0 if self.mode == "ablate" else self.value


@dataclass(frozen=True)
class SteeringSpec:
    features: tuple[FeatureEdit, ...]  # sorted by (layer, index): order-independent identity
    apply_to: ApplyTo = "all"

    @staticmethod
    def create(features: list[FeatureEdit], apply_to: ApplyTo = "all") -> "SteeringSpec":
        return SteeringSpec(tuple(sorted(features)), apply_to)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({f.layer for f in self.features}))

    def canonical_json(self) -> str:
        return json.dumps(
            {"features": [asdict(f) for f in self.features], "apply_to": self.apply_to},
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def id(self) -> str:
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()
        return f"steer-{digest[:16]}"

    def echo(self) -> dict:
        """The `steering` object returned to clients: normalised spec plus its id."""
        return {
            "id": self.id,
            "features": [
                {"layer": f.layer, "index": f.index, "mode": f.mode}
                | ({} if f.mode == "ablate" else {"value": f.value})
                for f in self.features
            ],
            "apply_to": self.apply_to,
        }

    def to_extra_arg(self) -> str:
        return request_signing.sign(self.canonical_json())

    @staticmethod
    def from_extra_arg(raw: object) -> "SteeringSpec":
        """Raises (SignatureError, ValueError, KeyError, TypeError) unless `raw` is what
        to_extra_arg made in this deployment."""
        data = json.loads(request_signing.verify(raw))
        features = [
            FeatureEdit(int(f["layer"]), int(f["index"]), f["mode"], float(f["value"]))
            for f in data["features"]
        ]
        if not features or any(f.mode not in MODES or not math.isfinite(f.value) for f in features):
            raise ValueError("a steering spec needs features with a known mode and a finite value")
        if data["apply_to"] not in APPLY_TO:
            raise ValueError(f"unknown apply_to {data['apply_to']!r}")
        return SteeringSpec.create(features, data["apply_to"])
