"""The normalised steering spec: what a request asks the SAE step to do.

The HTTP layer validates user JSON into this form; it travels to the workers as one signed JSON
string (signing.py) in `SamplingParams.extra_args[rpc.EXTRA_ARGS_KEY]` (vLLM only forwards flat str/int/float values),
and the workers decode it back. The id is a hash of the canonical form, so equal specs share a
config slot and a prefix-cache salt however the user ordered them.

An edit may carry a gate (`when`): it applies at a token only where another feature's activation,
computed in the same forward pass at a layer at or before the edit's, lies in the gate's open
interval (above, below): `gate_passes` is that rule, which the PyTorch backend applies as it is
and the native and Triton kernels implement. A spec's distinct gates are numbered in its canonical order
(`SteeringSpec.gates`); the workers keep one pass/fail column per gate and row, and report how
many tokens passed each (gating.py).

Beside the SAE features, a spec may carry direction vectors (`VectorEdit`): a raw d_model
direction v at a layer's residual stream, added (`x += value * v`), capped (the projection of
x on u = v / |v| held at most `value`) or ablated (`x -= (x . u) u`). A vector travels as the
base64 of its little-endian float32s, the encoding `trace` residuals use; an API that later
resolves stored vectors by name hands the workers this same form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from steerserve_sae.protocol import signing

Mode = Literal["add", "clamp", "scale", "ablate"]
ApplyTo = Literal["all", "prompt", "generation"]
MODES: tuple[str, ...] = ("add", "clamp", "scale", "ablate")  # what the workers accept
VectorMode = Literal["add", "cap", "ablate"]
VECTOR_MODES: tuple[str, ...] = ("add", "cap", "ablate")
APPLY_TO: tuple[str, ...] = ("all", "prompt", "generation")


def gate_passes(activation, above, below):
    """The gate rule: above < activation < below, elementwise (floats or tensors alike)."""
    return (activation > above) & (activation < below)


def gate_problem(above: float | None, below: float | None) -> tuple[str | None, str] | None:
    """None if (above, below) is a gate's interval (finite bounds, at least one, above < below);
    else (the bound at fault, None for both, and why)."""
    if above is None and below is None:
        return None, "a gate needs `above`, `below` or both"
    for name, bound in (("above", above), ("below", below)):
        if bound is not None and not math.isfinite(bound):
            return name, f"{name} must be a finite number"
    if above is not None and below is not None and not above < below:
        return "below", f"no activation is above {above:g} and below {below:g}"
    return None


@dataclass(frozen=True)
class Gate:
    """Feature `index` of the SAE at `layer` must be > above and < below (None: unbounded)."""

    layer: int
    index: int
    above: float | None = None
    below: float | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        """The open interval as two floats (what the kernels compare against)."""
        return (-math.inf if self.above is None else self.above, math.inf if self.below is None else self.below)

    def to_json(self) -> dict:
        return {"layer": self.layer, "index": self.index} | (
            {} if self.above is None else {"above": self.above}) | ({} if self.below is None else {"below": self.below})

    @staticmethod
    def from_json(data: dict) -> "Gate":
        above, below = data.get("above"), data.get("below")
        gate = Gate(int(data["layer"]), int(data["index"]), None if above is None else float(above),
                    None if below is None else float(below))
        problem = gate_problem(gate.above, gate.below)
        if problem is not None:
            raise ValueError(f"{problem[1]}: {data}")
        return gate

    def sort_key(self) -> tuple:
        return (self.layer, self.index, *self.bounds)


@dataclass(frozen=True)
class FeatureEdit:
    layer: int
    index: int
    mode: Mode
    value: float  # 0.0 for ablate
    when: Gate | None = None  # applies only at tokens where the gate passes

    @property
    def target(self) -> float:
        """Value used by the clamp-family math (ablate is clamp to 0)."""
        return 0.0 if self.mode == "ablate" else self.value

    def sort_key(self) -> tuple:
        return (self.layer, self.index, self.mode, self.value, self.when.sort_key() if self.when else ())

    def to_json(self) -> dict:
        edit = {"layer": self.layer, "index": self.index, "mode": self.mode, "value": self.value}
        return edit | ({"when": self.when.to_json()} if self.when else {})


def decode_vector(text: str) -> np.ndarray:
    """The float32 values of a base64 little-endian float32 vector; ValueError if `text` is not
    base64 of whole float32s."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


VECTOR_NOT_FINITE = "vector components must be finite, and so must their norm in float32 (no NaN or infinity)"


def finite_vector(values: np.ndarray) -> bool:
    """Finite components with a finite float32 norm: 256 x 3e38 has finite components, but its
    norm (echoed, and the divisor of a projection) is infinity in float32."""
    if not np.isfinite(values).all():
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.linalg.norm(values.astype(np.float32))))


def encode_vector(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


@dataclass(frozen=True)
class VectorEdit:
    """A direction vector at `layer`'s residual stream; `vector` is canonical base64 (encode_vector)."""

    layer: int
    vector: str
    mode: VectorMode
    value: float  # 0.0 for ablate
    when: Gate | None = None

    def values(self) -> np.ndarray:
        return decode_vector(self.vector)

    @property
    def vector_id(self) -> str:
        """A short digest of the vector's bytes: what the echo shows instead of the vector."""
        return f"vec-{hashlib.sha256(self.vector.encode()).hexdigest()[:16]}"

    def sort_key(self) -> tuple:
        return (self.layer, self.mode, self.vector, self.value, self.when.sort_key() if self.when else ())

    def to_json(self) -> dict:
        edit = {"layer": self.layer, "vector": self.vector, "mode": self.mode, "value": self.value}
        return edit | ({"when": self.when.to_json()} if self.when else {})

    @staticmethod
    def from_json(data: dict) -> "VectorEdit":
        values = decode_vector(data["vector"])
        edit = VectorEdit(int(data["layer"]), encode_vector(values), data["mode"], float(data["value"]),
                          Gate.from_json(data["when"]) if data.get("when") is not None else None)
        if edit.mode not in VECTOR_MODES or not math.isfinite(edit.value) or not finite_vector(values):
            raise ValueError("a steering vector needs a known mode, a finite value and finite components")
        if edit.mode != "add" and not np.any(values):
            raise ValueError(f"mode {edit.mode!r} needs a non-zero vector (it has no direction)")
        return edit


@dataclass(frozen=True)
class SteeringSpec:
    features: tuple[FeatureEdit, ...]  # sorted by (layer, index): order-independent identity
    apply_to: ApplyTo = "all"
    vectors: tuple[VectorEdit, ...] = ()  # sorted by VectorEdit.sort_key

    @staticmethod
    def create(features: list[FeatureEdit], apply_to: ApplyTo = "all",
               vectors: list[VectorEdit] = ()) -> "SteeringSpec":
        return SteeringSpec(tuple(sorted(features, key=FeatureEdit.sort_key)), apply_to,
                            tuple(sorted(vectors, key=VectorEdit.sort_key)))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({f.layer for f in self.features} | {v.layer for v in self.vectors}))

    @property
    def gates(self) -> tuple[Gate, ...]:
        """Distinct gates in canonical order: gate column c of a row is gates[c]'s pass/fail."""
        edits = (*self.features, *self.vectors)
        return tuple(dict.fromkeys(e.when for e in edits if e.when is not None))

    def gate_column(self, gate: Gate) -> int:
        """The gate column (per row of a step, and per count of the gate report) of `gate`."""
        return self.gates.index(gate)

    def canonical_json(self) -> str:
        vectors = {"vectors": [v.to_json() for v in self.vectors]} if self.vectors else {}
        return json.dumps(
            {"features": [f.to_json() for f in self.features], "apply_to": self.apply_to} | vectors,
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def id(self) -> str:
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()
        return f"steer-{digest[:16]}"

    def echo(self, gate_report: dict | None = None, vector_names: dict[tuple[int, str], str] | None = None) -> dict:
        """The `steering` object returned to clients: normalised spec plus its id; with the
        workers' gate report (gating.py), the tokens the spec steered and, per gated edit, the
        tokens its gate let through. `vector_names` ((layer, base64) -> name) names the vectors
        a request took from the store by name."""
        names = vector_names or {}
        passed = gate_report["passed"] if gate_report else None

        def gated(edit: FeatureEdit | VectorEdit) -> dict:
            return ({"value": edit.value} if edit.mode != "ablate" else {}) | (
                {"when": edit.when.to_json()} if edit.when else {}) | (
                {"edited_tokens": passed[self.gate_column(edit.when)]} if edit.when and passed else {})

        vectors = {"vectors": [
            {"layer": v.layer, "vector_id": v.vector_id, "norm": float(np.linalg.norm(v.values())), "mode": v.mode}
            | ({"name": names[(v.layer, v.vector)]} if (v.layer, v.vector) in names else {})
            | gated(v) for v in self.vectors]} if self.vectors else {}
        return {
            "id": self.id,
            "features": [{"layer": f.layer, "index": f.index, "mode": f.mode} | gated(f) for f in self.features],
        } | vectors | {"apply_to": self.apply_to} | (
            {"steered_tokens": gate_report["tokens"]} if gate_report else {})

    def to_extra_arg(self) -> str:
        return signing.sign(self.canonical_json())

    @staticmethod
    def from_extra_arg(raw: object) -> "SteeringSpec":
        """Raises (SignatureError, ValueError, KeyError, TypeError) unless `raw` is what
        to_extra_arg made in this deployment."""
        data = json.loads(signing.verify(raw))
        features = [
            FeatureEdit(int(f["layer"]), int(f["index"]), f["mode"], float(f["value"]),
                        Gate.from_json(f["when"]) if f.get("when") is not None else None)
            for f in data["features"]
        ]
        vectors = [VectorEdit.from_json(v) for v in data.get("vectors", ())]
        if not (features or vectors) or any(f.mode not in MODES or not math.isfinite(f.value) for f in features):
            raise ValueError("a steering spec needs features or vectors, features with a known mode and a finite value")
        if any(e.when is not None and e.when.layer > e.layer for e in (*features, *vectors)):
            raise ValueError("a gate must read a layer at or before its edit's")
        if data["apply_to"] not in APPLY_TO:
            raise ValueError(f"unknown apply_to {data['apply_to']!r}")
        return SteeringSpec.create(features, data["apply_to"], vectors)
