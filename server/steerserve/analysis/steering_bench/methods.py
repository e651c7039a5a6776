"""What each concept is steered with: its edits, read from the server, and the methods built on
them with the steering spec of each at a strength.

Strengths are multiples of an edit's scale: a feature's mean activation when it fires (the
concept line's `mean_activation`, else the server's: its dashboard's `mean_activation` or the
label's "mean activation X"), a vector's own norm (value 1 adds the vector as stored, as the
contrast preset does), a preset's own values (1 is the preset as stored). Methods:
  none, prompt                   no steering (prompt: the concept asked for in the instruction)
  clamp, add, ablate             features: each edit's mode, values strength x mean activation
  add, ablate                    a vector or the contrast direction (one per contrast layer)
  preset                         the preset's spec, every value times the strength
  random-M                       method M with every feature replaced by a random one of its
                                 layer and every vector by a random direction of its norm
                                 (seeded), at the same values: is it the concept or any push?
  prompt+M                       the prompt with method M at M's chosen strength
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import httpx
import numpy as np

from steerserve_sae.protocol.spec import decode_vector, encode_vector

from steerserve.analysis.steering_bench.inputs import Concept

MEAN_IN_DESCRIPTION = re.compile(r"mean activation (\d+(?:\.\d+)?)")
FIXED = ("none", "prompt", "ablate")  # methods that take no strength


class ResolveError(RuntimeError):
    """A concept the server cannot steer as written; the message names the concept and line."""


@dataclass(frozen=True)
class Edit:
    layer: int
    index: int | None = None  # a feature's
    vector: str | None = None  # a vector's stored name or base64
    scale: float = 1.0  # what strength 1 sets the value to
    norm: float | None = None  # a vector's norm (its random control's)
    mode: str | None = None  # a preset's own mode; else the method's


@dataclass(frozen=True)
class Steered:
    """A concept as the server steers it."""

    concept: Concept
    edits: tuple[Edit, ...]
    swept: tuple[str, ...]  # the methods swept over strengths
    judge_features: tuple[tuple[int, int], ...]  # (layer, index) the offline concept judge reads
    apply_to: str | None = None  # a preset's

    @property
    def methods(self) -> tuple[str, ...]:
        ablate = ("ablate",) if self.concept.source != "preset" else ()
        return ("none", "prompt", *self.swept, *ablate, *(f"random-{m}" for m in self.swept))

    def spec(self, method: str, strength: float | None, random_edits: tuple[Edit, ...]) -> dict | None:
        """The steering field of `method` at `strength` (None: no steering)."""
        base = method.removeprefix("prompt+")
        if base in ("none", "prompt"):
            return None
        edits = random_edits if base.startswith("random-") else self.edits
        mode = base.removeprefix("random-")
        features, vectors = [], []
        for edit in edits:
            entry_mode = edit.mode or mode
            entry = {"layer": edit.layer, "mode": entry_mode}
            if entry_mode != "ablate":
                entry["value"] = round((strength or 0.0) * edit.scale, 4)
            if edit.index is not None:
                features.append({"index": edit.index, **entry})
            else:
                vectors.append({"vector": edit.vector, **entry})
        spec: dict = {}
        if features:
            spec["features"] = features
        if vectors:
            spec["vectors"] = vectors
        if self.apply_to:
            spec["apply_to"] = self.apply_to
        return spec


def _fail(concept: Concept, message: str) -> ResolveError:
    return ResolveError(f"{concept.where}: concept {concept.name!r}: {message}")


def _get(http: httpx.Client, concept: Concept, path: str, what: str) -> dict:
    response = http.get(path)
    if response.status_code != 200:
        raise _fail(concept, f"{what}: the server answered {response.status_code}: {_reason(response)}")
    return response.json()


def _reason(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _mean_activation(http: httpx.Client, concept: Concept, layer: int, index: int, given: float | None) -> float:
    """The concept line's mean activation, else the server's; the feature must exist either way."""
    info = _get(http, concept, f"/v1/features/{layer}/{index}", f"feature {layer}:{index}")
    if given is not None:
        return given
    if info.get("mean_activation"):
        return float(info["mean_activation"])
    found = MEAN_IN_DESCRIPTION.search(info.get("description") or "")
    if found and float(found.group(1)) > 0:
        return float(found.group(1))
    raise _fail(concept, f"feature {layer}:{index} has no mean activation to scale strengths by (neither a "
                         "dashboard nor its label gives one): add \"mean_activation\" to the feature")


def _vector_norm(http: httpx.Client, concept: Concept, name: str, layer: int) -> float:
    stored = _get(http, concept, f"/v1/steering/vectors/{name}", f"vector {name!r}")
    for entry in stored["layers"]:
        if entry["layer"] in (layer, None):
            return float(entry["norm"])
    raise _fail(concept, f"vector {name!r} has no direction for layer {layer} (it has "
                         f"{[e['layer'] for e in stored['layers']]})")


def resolve(http: httpx.Client, concept: Concept) -> Steered:
    """The concept's edits as the server has them; ResolveError naming the concept and line."""
    if concept.features:
        edits = tuple(Edit(f.layer, f.index, scale=_mean_activation(http, concept, f.layer, f.index, f.mean_activation))
                      for f in concept.features)
        return Steered(concept, edits, ("clamp", "add"), tuple((f.layer, f.index) for f in concept.features))
    if concept.vector:
        norm = _vector_norm(http, concept, concept.vector, concept.layer)
        return Steered(concept, (Edit(concept.layer, vector=concept.vector, norm=norm),), ("add",), ())
    if concept.preset:
        preset = _get(http, concept, f"/v1/steering/presets/{concept.preset}", f"preset {concept.preset!r}")
        spec = preset["steering"]
        edits = [Edit(f["layer"], f["index"], scale=f.get("value", 0.0), mode=f["mode"]) for f in spec.get("features", [])]
        for v in spec.get("vectors", []):
            norm = (float(np.linalg.norm(decode_vector(v["vector"]))) if len(v["vector"]) > 64
                    else _vector_norm(http, concept, v["vector"], v["layer"]))
            edits.append(Edit(v["layer"], vector=v["vector"], scale=v.get("value", 0.0), norm=norm, mode=v["mode"]))
        return Steered(concept, tuple(edits), ("preset",),
                       tuple((e.layer, e.index) for e in edits if e.index is not None), spec.get("apply_to"))
    contrast = concept.contrast
    response = http.post("/v1/features/contrast", json={"positive": list(contrast.positive),
                                                         "negative": list(contrast.negative),
                                                         "layers": list(contrast.layers), "top_k": 1})
    if response.status_code != 200:
        raise _fail(concept, f"contrast: the server answered {response.status_code}: {_reason(response)}")
    layers = response.json()["contrast"]
    edits = tuple(Edit(int(layer), vector=found["direction"]["vector"], norm=found["direction"]["norm"])
                  for layer, found in sorted(layers.items(), key=lambda item: int(item[0])))
    return Steered(concept, edits, ("add",),
                   tuple((int(layer), found["features"][0]["index"]) for layer, found in layers.items()))


def random_edits(steered: Steered, d_sae: dict[int, int], d_model: int, seed: int) -> tuple[Edit, ...]:
    """The random control's edits: each feature replaced by a random feature of its layer that is
    not one of the concept's, each vector by a random direction of the same norm; seeded by the
    run's seed and the concept's name, so a rerun steers the same."""
    rng = random.Random(f"{seed}:{steered.concept.name}")
    taken = {(e.layer, e.index) for e in steered.edits}
    out = []
    for edit in steered.edits:
        if edit.index is not None:
            choices = [i for i in range(d_sae[edit.layer]) if (edit.layer, i) not in taken]
            index = rng.choice(choices)
            taken.add((edit.layer, index))
            out.append(replace(edit, index=index))
        else:
            direction = np.random.default_rng(rng.randrange(2**32)).standard_normal(d_model)
            direction *= (edit.norm or 1.0) / np.linalg.norm(direction)
            out.append(replace(edit, vector=encode_vector(direction.astype(np.float32))))
    return tuple(out)
