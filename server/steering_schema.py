"""The `steering` request field: pydantic schema plus the checks against the loaded SAEs.

Every problem becomes an APIError whose `param` is the JSON path of the offending value
(`steering.features[2].index`), so a client can point at exactly what to fix.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from sae_plugins.steering_spec import FeatureEdit, SteeringSpec

from .errors import APIError, from_validation


class FeatureSteering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: StrictInt
    index: StrictInt
    mode: Literal["add", "clamp", "scale", "ablate"]
    value: StrictFloat | None = None  # strict: ints are accepted, strings and bools are not


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: list[FeatureSteering] = Field(min_length=1)
    apply_to: Literal["all", "prompt", "generation"] = "all"
    compare: StrictBool = False  # also return the unsteered completion (not part of the spec)


def parse_steering(
    raw: object, sae_sizes: dict[int, int], max_features: int, max_value: float
) -> tuple[SteeringSpec, bool]:
    """Validate user JSON into a normalised spec and the `compare` flag.
    `sae_sizes` maps loaded layer -> d_sae; `max_value` bounds |value| (see server/limits.py)."""
    if not sae_sizes:
        raise APIError(
            "steering is unavailable: this server was started without --sae",
            param="steering",
            code="steering_unavailable",
        )
    try:
        steering = Steering.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, prefix="invalid steering", code="invalid_steering", root="steering") from None
    if len(steering.features) > max_features:
        raise APIError(
            f"steering has {len(steering.features)} features; this server allows at most {max_features}",
            param="steering.features",
            code="too_many_features",
        )
    edits: list[FeatureEdit] = []
    seen: dict[tuple[int, int], int] = {}
    for i, f in enumerate(steering.features):
        at = f"steering.features[{i}]"
        if f.layer not in sae_sizes:
            raise APIError(
                f"no SAE is loaded at layer {f.layer}; loaded layers: {sorted(sae_sizes)}",
                param=f"{at}.layer",
                code="layer_not_loaded",
            )
        if not 0 <= f.index < sae_sizes[f.layer]:
            raise APIError(
                f"feature index {f.index} is out of range for layer {f.layer} (0..{sae_sizes[f.layer] - 1})",
                param=f"{at}.index",
                code="index_out_of_range",
            )
        if f.mode == "ablate":
            if f.value is not None:
                raise APIError("mode 'ablate' takes no value", param=f"{at}.value", code="invalid_value")
            value = 0.0
        else:
            if f.value is None:
                raise APIError(f"mode {f.mode!r} needs a numeric value", param=f"{at}.value", code="missing_value")
            value = float(f.value)
            if not math.isfinite(value):
                raise APIError("value must be a finite number", param=f"{at}.value", code="invalid_value")
            if abs(value) > max_value:
                raise APIError(f"|value| must be at most {max_value:g} on this server (--max-steering-value)",
                               param=f"{at}.value", code="value_out_of_range")
        key = (f.layer, f.index)
        if key in seen:
            raise APIError(
                f"feature {f.index} at layer {f.layer} already appears at steering.features[{seen[key]}]",
                param=at,
                code="duplicate_feature",
            )
        seen[key] = i
        edits.append(FeatureEdit(f.layer, f.index, f.mode, value))
    return SteeringSpec.create(edits, steering.apply_to), steering.compare
