"""The `steering` request field: pydantic schema plus the checks against the loaded SAEs.

Every problem becomes an APIError whose `param` is the JSON path of the offending value
(`steering.features[2].index`), so a client can point at exactly what to fix.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from steerserve_sae.protocol.spec import FeatureEdit, Gate, SteeringSpec, VectorEdit, decode_vector, encode_vector, \
    finite_vector, gate_problem, VECTOR_NOT_FINITE
from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_VECTORS

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


class VectorSteering(BaseModel):
    """A direction vector: base64 of d_model little-endian float32s (the `trace` residual encoding)."""

    model_config = ConfigDict(extra="forbid")
    layer: StrictInt
    vector: StrictStr
    mode: Literal["add", "cap", "ablate"]
    value: StrictFloat | None = None
    when: FeatureGate | None = None


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: list[FeatureSteering] = []
    vectors: list[VectorSteering] = []
    apply_to: Literal["all", "prompt", "generation"] = "all"
    compare: StrictBool = False  # also return the unsteered completion (not part of the spec)


def parse_steering(
    raw: object, sae_sizes: dict[int, int], max_features: int, max_value: float,
    stages: tuple[frozenset[int], ...] = (), d_model: int = 0, max_vectors: int = DEFAULT_MAX_VECTORS,
    vector_layers: frozenset[int] = frozenset(),
) -> tuple[SteeringSpec, bool]:
    """Validate user JSON into a normalised spec and the `compare` flag.
    `sae_sizes` maps loaded layer -> d_sae; `max_value` bounds |value| (see server/steerserve/limits.py);
    `stages` are the layer sets of the pipeline stages (a gate must share its edit's);
    `d_model` is the length of a steering vector, `max_vectors` how many a request may have;
    `vector_layers` are the layers without an SAE where vectors may steer (--steering-layers)."""
    if not sae_sizes and not vector_layers:
        raise APIError(
            "steering is unavailable: this server was started without --sae or --steering-layers",
            param="steering",
            code="steering_unavailable",
        )
    try:
        steering = Steering.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, prefix="invalid steering", code="invalid_steering", root="steering") from None
    if not steering.features and not steering.vectors:
        raise APIError("steering needs at least 1 feature or vector", param="steering.features",
                       code="invalid_steering")
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
        index_in_range(loaded_layer(sae_sizes, f.layer, f"{at}.layer", vector_layers=vector_layers), f.layer,
                       f.index, f"{at}.index")
        value = _value(f.mode, f.value, max_value, at)
        key = (f.layer, f.index)
        if key in seen:
            raise APIError(
                f"feature {f.index} at layer {f.layer} already appears at steering.features[{seen[key]}]",
                param=at,
                code="duplicate_feature",
            )
        seen[key] = i
        gate = _gate(f.when, f.layer, sae_sizes, stages, f"{at}.when", vector_layers) if f.when is not None else None
        edits.append(FeatureEdit(f.layer, f.index, f.mode, value, gate))
    vectors = _vectors(steering.vectors, sae_sizes, max_value, stages, d_model, max_vectors, vector_layers)
    spec = SteeringSpec.create(edits, steering.apply_to, vectors)
    if len(spec.gates) > max_features:  # gate columns per row are as many as a request's features
        raise APIError(f"steering has {len(spec.gates)} distinct gates; this server allows at most {max_features}",
                       param="steering", code="too_many_gates")
    return spec, steering.compare


def _value(mode: str, value: float | None, max_value: float, at: str) -> float:
    """An edit's value: none for ablate, else a finite number within --max-steering-value."""
    if mode == "ablate":
        if value is not None:
            raise APIError("mode 'ablate' takes no value", param=f"{at}.value", code="invalid_value")
        return 0.0
    if value is None:
        raise APIError(f"mode {mode!r} needs a numeric value", param=f"{at}.value", code="missing_value")
    if not math.isfinite(value):
        raise APIError("value must be a finite number", param=f"{at}.value", code="invalid_value")
    if abs(value) > max_value:
        raise APIError(f"|value| must be at most {max_value:g} on this server (--max-steering-value)",
                       param=f"{at}.value", code="value_out_of_range")
    return float(value)


def _vectors(vectors: list[VectorSteering], sae_sizes: dict[int, int], max_value: float,
             stages: tuple[frozenset[int], ...], d_model: int, max_vectors: int,
             vector_layers: frozenset[int]) -> list[VectorEdit]:
    """Direction vectors, at layers with an SAE or named by --steering-layers, each d_model finite
    float32s (non-zero where the mode needs a direction)."""
    steerable = sorted({*sae_sizes, *vector_layers})
    if len(vectors) > max_vectors:
        raise APIError(f"steering has {len(vectors)} vectors; this server allows at most {max_vectors} "
                       "(--max-steering-vectors)", param="steering.vectors", code="too_many_vectors")
    edits = []
    for i, v in enumerate(vectors):
        at = f"steering.vectors[{i}]"
        if v.layer not in steerable:
            raise APIError(f"no direction vector can steer layer {v.layer}: it has no SAE and is not one of "
                           f"--steering-layers; vectors may steer layers {steerable}", param=f"{at}.layer",
                           code="layer_not_loaded")
        try:
            values = decode_vector(v.vector)
        except ValueError as exc:
            raise APIError(f"vector must be base64 of {d_model} little-endian float32 values: {exc}",
                           param=f"{at}.vector", code="invalid_vector") from None
        if values.size != d_model:
            raise APIError(f"vector has {values.size} float32 values; the residual stream has {d_model} (d_model)",
                           param=f"{at}.vector", code="invalid_vector")
        if not finite_vector(values):
            raise APIError(VECTOR_NOT_FINITE, param=f"{at}.vector", code="invalid_vector")
        if v.mode != "add" and not np.any(values):
            raise APIError(f"mode {v.mode!r} needs a non-zero vector (it projects on its direction)",
                           param=f"{at}.vector", code="invalid_vector")
        value = _value(v.mode, v.value, max_value, at)
        gate = _gate(v.when, v.layer, sae_sizes, stages, f"{at}.when", vector_layers) if v.when is not None else None
        edits.append(VectorEdit(v.layer, encode_vector(values), v.mode, value, gate))
    return edits


def _gate(when: FeatureGate, edit_layer: int, sae_sizes: dict[int, int], stages: tuple[frozenset[int], ...],
          at: str, vector_layers: frozenset[int] = frozenset()) -> Gate:
    """The gate of an edit at `edit_layer`: a loaded layer at or before it on the same pipeline
    stage, a feature in range, and a non-empty open interval of finite bounds."""
    d_sae = loaded_layer(sae_sizes, when.layer, f"{at}.layer", vector_layers=vector_layers)
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
