"""The `steering` request field: pydantic schema plus the checks against the loaded SAEs.

Every problem becomes an APIError whose `param` is the JSON path of the offending value
(`steering.features[2].index`), so a client can point at exactly what to fix.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from steerserve_sae.protocol.spec import FeatureEdit, Gate, SteeringSpec, gate_problem

from steerserve.errors import APIError, from_validation
from steerserve.steering.sae_checks import index_in_range, loaded_layer


class FeatureGate(BaseModel):
    """`when`: the edit applies only at tokens where this feature is > above and < below."""

    model_config = ConfigDict(extra="forbid")
    layer: StrictInt
    index: StrictInt
    above: StrictFloat | None = None
    below: StrictFloat | None = None


class FeatureSteering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: StrictInt
    index: StrictInt
    mode: Literal["add", "clamp", "scale", "ablate"]
    value: StrictFloat | None = None  # strict: ints are accepted, strings and bools are not
    when: FeatureGate | None = None


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: list[FeatureSteering] = Field(min_length=1)
    apply_to: Literal["all", "prompt", "generation"] = "all"
    compare: StrictBool = False  # also return the unsteered completion (not part of the spec)


def parse_steering(
    raw: object, sae_sizes: dict[int, int], max_features: int, max_value: float,
    stages: tuple[frozenset[int], ...] = (),
) -> tuple[SteeringSpec, bool]:
    """Validate user JSON into a normalised spec and the `compare` flag.
    `sae_sizes` maps loaded layer -> d_sae; `max_value` bounds |value| (see server/limits.py);
    `stages` are the layer sets of the pipeline stages (a gate must share its edit's)."""
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
        index_in_range(loaded_layer(sae_sizes, f.layer, f"{at}.layer"), f.layer, f.index, f"{at}.index")
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
        gate = _gate(f.when, f.layer, sae_sizes, stages, f"{at}.when") if f.when is not None else None
        edits.append(FeatureEdit(f.layer, f.index, f.mode, value, gate))
    return SteeringSpec.create(edits, steering.apply_to), steering.compare


def _gate(when: FeatureGate, edit_layer: int, sae_sizes: dict[int, int], stages: tuple[frozenset[int], ...],
          at: str) -> Gate:
    """The gate of an edit at `edit_layer`: a loaded layer at or before it on the same pipeline
    stage, a feature in range, and a non-empty open interval of finite bounds."""
    d_sae = loaded_layer(sae_sizes, when.layer, f"{at}.layer")
    if when.layer > edit_layer:
        raise APIError(f"a gate must read a layer at or before its edit's (layer {edit_layer}), not {when.layer}: "
                       "the gate is computed in the same forward pass", param=f"{at}.layer", code="invalid_gate")
    if stages and not any(when.layer in stage and edit_layer in stage for stage in stages):
        raise APIError(f"layers {when.layer} and {edit_layer} run on different pipeline stages: a gate must be "
                       "on its edit's stage", param=f"{at}.layer", code="invalid_gate")
    index_in_range(d_sae, when.layer, when.index, f"{at}.index")
    problem = gate_problem(when.above, when.below)
    if problem is not None:
        bound, message = problem
        raise APIError(message, param=f"{at}.{bound}" if bound else at, code="invalid_gate")
    return Gate(when.layer, when.index, when.above, when.below)
