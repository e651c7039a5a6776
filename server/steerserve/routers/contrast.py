"""`POST /v1/features/contrast`: from two sets of examples to the features and the direction that
tell them apart.

Each text (or chat) runs through the same capture as `inspect` (routers/features.py), with every
token's top MAX_TOP_K features and the reconstruction sums, whose `sum_x` is the sum of the
residual stream over the text's non-special tokens. Per text, a feature's activation and the
stream are averaged over those tokens (a feature outside a token's top MAX_TOP_K counts as 0:
exact for TopK SAEs with k <= MAX_TOP_K); per set, the texts' means are averaged, each text
weighing the same. Features are ranked by the difference of the set means, with a Welch t score
over the texts; the direction is the difference of the stream's set means (contrastive activation
addition, CAA). `save_as` stores the directions as a vector with one entry per layer, and a
preset of the same name that adds each at its layer (value 1: with several layers these add up,
each layer's difference already holding the earlier layers' effect).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, StrictStr

from steerserve_sae.protocol.spec import decode_vector, encode_vector

from steerserve.errors import APIError
from steerserve.limits import MAX_TOP_K
from steerserve.prompt_tokens import prompt_token_ids
from steerserve.routers.feature_models import InspectRequest
from steerserve.routers.features import (
    _context, _label_fields, _loaded_layer, _require_saes, _run_inspection, _special_ids,
)
from steerserve.routers.presets import model_name_taken
from steerserve.routers.route import SteerserveRoute
from steerserve.steering.presets import Preset, preset_exists, too_many_presets, validate_spec
from steerserve.steering.vector_store import check_name, new_vector, vector_exists

router = APIRouter(route_class=SteerserveRoute)


def _example(value: Any) -> Any:
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
        return value
    raise ValueError("an example is a text or a chat (a list of messages)")


# a text, or a chat rendered as chat completions render it
Example = Annotated[Any, PlainValidator(_example, json_schema_input_type=StrictStr | list[dict[str, Any]])]


class ContrastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    positive: list[Example] = Field(description="texts or chats showing the behaviour", min_length=1)
    negative: list[Example] = Field(description="texts or chats without it", min_length=1)
    layers: list[StrictInt] | None = Field(None, description="loaded SAE layers (default: all)")
    top_k: StrictInt = Field(20, ge=1, le=MAX_TOP_K, description="features listed per layer")
    add_generation_prompt: StrictBool = False
    save_as: StrictStr | None = Field(None, description="store the directions as a vector of this name")


class ContrastFeature(BaseModel):
    index: int
    positive_mean: float
    negative_mean: float
    difference: float
    t: float | None  # None: no variance in either set
    label: str | None
    description: str | None


class Direction(BaseModel):
    vector: str  # base64 of d_model little-endian float32s
    norm: float


class LayerContrast(BaseModel):
    features: list[ContrastFeature]
    direction: Direction


class SetSize(BaseModel):
    texts: int
    tokens: int


class FeatureContrast(BaseModel):
    object: Literal["feature_contrast"]
    model: str
    layers: list[int]
    positive: SetSize
    negative: SetSize
    contrast: dict[str, LayerContrast]
    saved: dict[str, str] | None = None  # with save_as: the vector's and the preset's name


async def _tokens(context, examples: list, side: str, add_generation_prompt: bool) -> list[list[int]]:
    """Each example's token ids; a 400 for one with no token but special ones (nothing to average)."""
    special = _special_ids(context.engine.get_tokenizer())
    out = []
    for i, example in enumerate(examples):
        if isinstance(example, str):
            prompt, field = {"prompt": example}, "prompt"
        else:
            prompt, field = {"messages": example, "add_generation_prompt": add_generation_prompt}, "messages"
        try:
            out.append(await prompt_token_ids(context, prompt, field, context.max_model_len - 1))
        except APIError as error:
            error.param = f"{side}[{i}]"
            raise
        if all(t in special for t in out[-1]):
            raise APIError(f"{side}[{i}] has no tokens but special ones", param=f"{side}[{i}]",
                           code="invalid_request")
    return out


def _text_means(inspection: dict, layers: list[int], d_sae: dict[int, int]) -> tuple[dict, dict, int]:
    """Per layer: the text's mean feature activations [d_sae] and mean stream [d_model] over its
    non-special tokens, and their count."""
    features, streams, count = {}, {}, 0
    for layer in layers:
        sums = inspection["quality"][str(layer)]["sums"]
        count = sums["tokens"]
        mean = np.zeros(d_sae[layer])
        for token in inspection["tokens"]:
            if not token["special"]:
                for f in token["features"][str(layer)]:
                    mean[f["index"]] += f["activation"]
        features[layer] = mean / max(count, 1)
        streams[layer] = np.asarray(sums["sum_x"], dtype=np.float64) / max(count, 1)
    return features, streams, count


def _welch_t(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Welch's t over texts, per feature (NaN where neither set varies)."""
    var = (p.var(axis=0, ddof=1) / len(p) if len(p) > 1 else 0) + (n.var(axis=0, ddof=1) / len(n) if len(n) > 1 else 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, (p.mean(axis=0) - n.mean(axis=0)) / np.sqrt(var), np.nan)


def _contrast(context, layers: list[int], top_k: int, pos: list, neg: list) -> dict[str, Any]:
    result = {}
    for layer in layers:
        p = np.stack([means[0][layer] for means in pos])
        n = np.stack([means[0][layer] for means in neg])
        diff = p.mean(axis=0) - n.mean(axis=0)
        t = _welch_t(p, n)
        ranked = np.argsort(-diff, kind="stable")[:top_k]
        direction = (np.mean([m[1][layer] for m in pos], axis=0) - np.mean([m[1][layer] for m in neg], axis=0))
        direction = direction.astype(np.float32)
        result[str(layer)] = {
            "features": [{"index": int(i), "positive_mean": float(p[:, i].mean()), "negative_mean": float(n[:, i].mean()),
                          "difference": float(diff[i]), "t": None if math.isnan(t[i]) else float(t[i]),
                          **_label_fields(context, layer, int(i))} for i in ranked],
            "direction": {"vector": encode_vector(direction), "norm": float(np.linalg.norm(direction))}}
    return result


@router.post("/v1/features/contrast", response_model=FeatureContrast, response_model_exclude_unset=True)
async def contrast(request: Request, req: ContrastRequest) -> dict[str, Any] | JSONResponse:
    context = _context(request)
    _require_saes(context)
    limits = context.limits
    for side, examples in (("positive", req.positive), ("negative", req.negative)):
        if len(examples) > limits.max_contrast_texts:
            raise APIError(f"{side} has {len(examples)} examples; this server takes at most {limits.max_contrast_texts} "
                           "per set (--max-contrast-texts)", param=side, code="too_many_examples")
    layers = sorted(set(req.layers if req.layers is not None else context.sae_by_layer))
    if not layers:
        raise APIError("layers must name at least one loaded layer", param="layers", code="invalid_request")
    for i, layer in enumerate(req.layers or ()):
        _loaded_layer(context, layer, f"layers[{i}]")
    if req.save_as is not None:
        _check_save_as(context, req.save_as, layers)
    pos_ids = await _tokens(context, req.positive, "positive", req.add_generation_prompt)
    neg_ids = await _tokens(context, req.negative, "negative", req.add_generation_prompt)
    total = sum(map(len, pos_ids + neg_ids))
    if total > limits.max_contrast_tokens:
        raise APIError(f"the examples are {total} tokens in all; this server takes at most {limits.max_contrast_tokens} "
                       "(--max-contrast-tokens)", param="positive", code="too_many_tokens")
    capture = InspectRequest(top_k=MAX_TOP_K, quality=True, layers=layers)
    inspections = await asyncio.gather(*(_run_inspection(context, capture, layers, ids) for ids in pos_ids + neg_ids))
    for inspection in inspections:
        if isinstance(inspection, JSONResponse):
            return inspection
    d_sae = {layer: context.sae_by_layer[layer]["d_sae"] for layer in layers}
    means = await asyncio.to_thread(lambda: [_text_means(i, layers, d_sae) for i in inspections])
    pos, neg = means[:len(pos_ids)], means[len(pos_ids):]
    result = await asyncio.to_thread(_contrast, context, layers, req.top_k, pos, neg)
    answer = {"object": "feature_contrast", "model": context.served_model, "layers": layers,
              "positive": {"texts": len(pos), "tokens": sum(m[2] for m in pos)},
              "negative": {"texts": len(neg), "tokens": sum(m[2] for m in neg)}, "contrast": result}
    if req.save_as is not None:
        directions = {layer: decode_vector(result[str(layer)]["direction"]["vector"]) for layer in layers}
        answer["saved"] = await _save(context, req.save_as, directions,
                                      f"contrast of {len(pos)} positive and {len(neg)} negative examples")
    return answer


def _check_save_as(context, name: str, layers: list[int]) -> None:
    """What would stop `save_as` storing its vector and preset, checked before any work is done."""
    check_name(name, "save_as")
    if context.vectors is None:
        raise APIError("stored vectors are unavailable on this server", param="save_as", code="unavailable")
    model_name_taken(name, context, "save_as")
    presets, limits = context.presets, context.limits
    if presets is not None and presets.get(name) is not None:
        raise preset_exists(name, "save_as")
    if context.vectors.get(name) is not None:
        raise vector_exists(name, param="save_as")
    if presets is not None and presets.count() >= limits.max_presets:  # checked again when it is stored
        raise too_many_presets(limits.max_presets, "save_as")
    if presets is not None and len(layers) > limits.max_steering_vectors:
        raise APIError(f"save_as stores a preset with a vector at each of {len(layers)} layers; this server steers "
                       f"with at most {limits.max_steering_vectors} (--max-steering-vectors): name fewer "
                       "`layers`", param="save_as", code="too_many_vectors")


async def _save(context, name: str, directions: dict[int, np.ndarray], description: str) -> dict[str, str]:
    """The directions as a vector `name` and a preset `name` that adds each (value 1) at its layer;
    neither is stored when either cannot be (the name was checked by _check_save_as)."""
    presets = context.presets
    try:
        await asyncio.to_thread(context.vectors.put, new_vector(name, directions, description, "contrast",
                                                                context.vectors.d_model))
    except APIError as error:
        error.param = "save_as"
        raise
    if presets is None:
        return {"vector": name}
    steering = {"vectors": [{"layer": layer, "vector": name, "mode": "add", "value": 1.0} for layer in directions]}
    try:
        validate_spec(steering, context)
        preset = Preset(name, steering, description, int(time.time()), "contrast")
        if not await asyncio.to_thread(presets.put, preset, replace=False, max_count=context.limits.max_presets):
            raise preset_exists(name, "save_as")
    except APIError as error:
        context.vectors.delete(name)
        error.param = "save_as"
        raise
    return {"vector": name, "preset": name}
