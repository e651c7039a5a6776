"""Mechanistic analysis over HTTP: which features fire on a text, what a feature writes.

`POST /v1/features/inspect` runs the text through the same engine forward that generation uses
(a one-token completion sent through this server's own app, so `steering` is validated and
applied exactly as for chat), with a capture spec that makes the workers record each token's
top SAE features; the result is taken back by capture id over collective RPC.
`GET /v1/features/{layer}/{index}` reports a feature's norms and logit lens, and
`GET /v1/features/search` finds features by label text (with --feature-dashboards also by
explanation and top-example text) or by the token they promote.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from steerserve_sae.protocol import rpc
from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.rpc import CAPTURE_KEY, CAPTURES

from steerserve.analysis import explanation_store
from steerserve.analysis.sae_quality import QualitySums
from steerserve.errors import APIError
from steerserve.limits import MAX_TOP_K
from steerserve.prompt_tokens import prompt_token_ids
from steerserve.routers.feature_models import (
    MAX_SEARCH_LIMIT, MAX_SEARCH_OFFSET, SEARCH_LIMIT, Feature, FeatureInspection, FeatureSearchPage, InspectRequest,
    SearchQuery,
)
from steerserve.routers.route import SteerserveRoute
from steerserve.steering.sae_checks import index_in_range, loaded_layer

router = APIRouter(route_class=SteerserveRoute)
LENS_TOP = 20


def _context(request: Request):
    return request.app.state.steerserve


def _special_ids(tokenizer) -> set[int]:
    """Special tokens, including added ones such as ChatML's <|im_start|>."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _loaded_layer(context, layer: int, param: str, status=HTTPStatus.BAD_REQUEST) -> dict:
    loaded_layer(context.sae_sizes, layer, param, status, context.vector_layers)
    return context.sae_by_layer[layer]


def _require_saes(context) -> None:
    if not context.saes:
        raise APIError("feature analysis is unavailable: this server was started without --sae",
                       code="features_unavailable")


@router.post("/v1/features/inspect", response_model=FeatureInspection, response_model_exclude_unset=True)
async def inspect(request: Request, req: InspectRequest) -> dict[str, Any] | JSONResponse:
    context = _context(request)
    _require_saes(context)
    if isinstance(req.steering, dict) and req.steering.get("compare"):
        raise APIError("inspect takes no steering.compare: inspect the steered and unsteered text in two calls",
                       param="steering.compare", code="invalid_steering")
    layers = req.layers if req.layers is not None else sorted(context.sae_by_layer)
    for i, layer in enumerate(layers):
        _loaded_layer(context, layer, f"layers[{i}]")
    if not layers:
        raise APIError("layers must name at least one loaded layer", param="layers", code="invalid_request")
    if not 1 <= req.top_k <= MAX_TOP_K:
        raise APIError(f"top_k must be between 1 and {MAX_TOP_K}", param="top_k", code="invalid_top_k")
    if len(req.watch) > MAX_TOP_K:
        raise APIError(f"watch takes at most {MAX_TOP_K} features", param="watch", code="invalid_request")
    for i, index in enumerate(req.watch):
        for layer in layers:
            if not 0 <= index < context.sae_by_layer[layer]["d_sae"]:
                raise APIError(f"feature index {index} is out of range for layer {layer}", param=f"watch[{i}]",
                               code="index_out_of_range")
    if (req.messages is None) == (req.prompt is None):
        raise APIError("give exactly one of `messages` or `prompt`", param="messages", code="invalid_request")
    if req.messages is not None:  # rendered as chat completions render them
        field, prompt = "messages", {"messages": req.messages, "add_generation_prompt": req.add_generation_prompt}
    else:
        field, prompt = "prompt", {"prompt": req.prompt}
    # one position is left for the token the forward generates
    token_ids = await prompt_token_ids(context, prompt, field, context.max_model_len - 1)
    assert token_ids is not None  # InspectRequest admits only a text or a chat
    return await _run_inspection(context, req, sorted(set(layers)), token_ids)


async def _run_inspection(context, req: InspectRequest, layers: list[int], token_ids: list[int]
                          ) -> dict[str, Any] | JSONResponse:
    tokenizer = context.engine.get_tokenizer()
    special_ids = _special_ids(tokenizer)
    special = [t in special_ids for t in token_ids]
    capture = CaptureSpec(
        id=uuid.uuid4().hex, layers=tuple(layers), top_k=req.top_k,
        exclude_from_aggregate=frozenset(i for i, s in enumerate(special) if s), quality=req.quality,
        splice=req.splice, watch=tuple(req.watch),
    )
    body = {"model": context.served_model, "prompt": token_ids, "max_tokens": 1, "temperature": 0,
            "vllm_xargs": {CAPTURE_KEY: capture.to_extra_arg()},
            "cache_salt": f"inspect-{capture.id}"}  # every position must really be computed
    if req.quality or req.next_token_logprobs:
        body["prompt_logprobs"] = req.next_token_logprobs  # the text's own next-token log-likelihoods
    if req.steering is not None:
        body["steering"] = req.steering
    taken = False
    try:
        response = await context.client.post("/v1/completions", content=json.dumps(body),
                                             headers={"content-type": "application/json"})
        if response.status_code != 200:  # e.g. invalid steering: the interactive error, unchanged
            return JSONResponse(response.json(), status_code=response.status_code)
        taken = True
        per_rank = await context.takes.take(CAPTURES, capture.id)  # a 503 if it outgrew the workers' store
    finally:
        if not taken:  # an error, or this handler cancelled: the workers must not keep the capture
            context.takes.discard([(CAPTURES, capture.id)])
    captured = rpc.merge_layers(per_rank)
    if any(layer not in captured for layer in layers):
        raise APIError("the engine returned no activations for this input", code="capture_lost",
                       status=HTTPStatus.INTERNAL_SERVER_ERROR, type="server_error")
    tokens = [
        {"position": i, "token_id": t, "token": _token_text(tokenizer, t), "special": special[i], "features": {}}
        for i, t in enumerate(token_ids)
    ]
    aggregate = {}
    for layer in layers:
        result = captured[layer]
        for position, indices, values in zip(result["positions"], result["indices"], result["values"]):
            tokens[position]["features"][str(layer)] = [
                {"index": i, "activation": v} for i, v in zip(indices, values)]
        for position, values in zip(result["positions"], result.get("watched", ())):
            tokens[position].setdefault("watched", {})[str(layer)] = [
                {"index": i, "activation": v} for i, v in zip(req.watch, values)]
        aggregate[str(layer)] = result["aggregate"]
    steering_echo = response.json().get("steering")
    result = {"object": "feature_inspection", "model": context.served_model, "layers": layers, "top_k": req.top_k,
              "steering": steering_echo, "tokens": tokens, "aggregate": aggregate}
    if "prompt_logprobs" in body:
        prompt_logprobs = response.json()["choices"][0]["prompt_logprobs"]
        result["nll"] = _mean_nll(prompt_logprobs, token_ids)
        if req.next_token_logprobs:  # predictions of tokens 1.. (vLLM also lists the actual token)
            result["next_token_logprobs"] = [{t: e["logprob"] for t, e in entry.items()}
                                             for entry in prompt_logprobs[1:]]
    if req.quality:  # summary plus the raw sums, which add up over requests (server/steerserve/analysis/sae_quality.py)
        result["quality"] = {
            str(layer): QualitySums.from_capture(captured[layer]["quality"]).summary(context.sae_by_layer[layer]["d_sae"])
            | {"sums": captured[layer]["quality"]}
            for layer in layers if "quality" in captured[layer]
        }
    return result


def _mean_nll(prompt_logprobs: list, token_ids: list[int]) -> float | None:
    """Mean negative log-likelihood of the text's tokens after the first (under any splice)."""
    nll = [-entry[str(t)]["logprob"] for t, entry in zip(token_ids[1:], prompt_logprobs[1:])]
    return sum(nll) / len(nll) if nll else None


@router.get("/v1/features/search", response_model=FeatureSearchPage, response_model_exclude_unset=True)
async def search(request: Request, query: Annotated[SearchQuery, Query()]) -> dict[str, Any]:
    context = _context(request)
    limit = _int_param(query.limit, "limit", SEARCH_LIMIT, 1, MAX_SEARCH_LIMIT)
    offset = _int_param(query.offset, "offset", 0, 0, MAX_SEARCH_OFFSET)
    layer = _int_param(query.layer, "layer", None, None, None)
    if (query.q is None) == (query.token is None):
        raise APIError("give exactly one of `q` (label text) or `token`", param="q", code="invalid_request")
    if query.q is not None:
        hits = [{"layer": f.layer, "index": f.index, "label": f.label, "description": f.description,
                 "score": score} for score, f in context.labels.search(query.q, layer)]
        if context.dashboards is not None:  # then features whose explanation, then top examples, contain it
            hits += await _dashboard_hits(context, query.q, layer, {(h["layer"], h["index"]) for h in hits})
    else:
        _require_saes(context)
        if layer is not None:
            _loaded_layer(context, layer, "layer")
        hits = await _token_search(context, query.token, layer, offset + limit)
    page = hits[offset : offset + limit]
    return {"object": "list", "data": page, "total": len(hits), "limit": limit, "offset": offset,
            "has_more": offset + limit < len(hits)}


async def _dashboard_hits(context, q: str, layer: int | None, labelled: set[tuple[int, int]]) -> list[dict]:
    """Matched by explanation, then by top examples; assembled in a thread (a common word matches
    tens of thousands of features)."""
    explained = await context.dashboards.read(explanation_store.search, q, layer)
    examples = await context.dashboards.search(q, layer)

    def assemble() -> list[dict]:
        texts = {(lyr, i): text for lyr, i, text in explained if (lyr, i) not in labelled}
        matched = {(lyr, i): n for lyr, i, n in examples}
        order = [*texts, *(k for k in matched if k not in labelled and k not in texts)]
        return [{"layer": k[0], "index": k[1], **_label_fields(context, *k), "score": 0.5,
                 "examples_matched": matched.get(k, 0), **({"explanation": texts[k]} if k in texts else {})}
                for k in order]
    return await asyncio.to_thread(assemble)


async def _token_search(context, token: str, layer: int | None, wanted: int) -> list[dict]:
    tokenizer = context.engine.get_tokenizer()
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise APIError(f"`token` must be exactly one token; {token!r} is {len(ids)} tokens: "
                       f"{[_token_text(tokenizer, t) for t in ids]}", param="token", code="not_a_single_token")
    layers = [layer] if layer is not None else sorted(context.sae_by_layer)
    key = (ids[0], tuple(layers))
    cached = context.token_search_cache.get(key)
    if cached is None or len(cached) < wanted:
        merged = rpc.merge_layers(await context.engine.collective_rpc(rpc.TOKEN_FEATURES, args=(ids[0], layers, wanted)))
        text = _token_text(tokenizer, ids[0])
        cached = sorted(
            ({"layer": lyr, "index": i, "logit": score, **_label_fields(context, lyr, i), "token": text}
             for lyr, rows in merged.items() for i, score in rows),
            key=lambda h: (-h["logit"], h["layer"], h["index"]),
        )
        context.token_search_cache.put(key, cached, context.limits.token_search_cache_bytes)
    return cached


def _label_fields(context, layer: int, index: int) -> dict:
    label = context.labels.get(layer, index)
    return {"label": label.label if label else None, "description": label.description if label else None}


def _int_param(raw: str | None, name: str, default, low, high):
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(f"`{name}` must be an integer", param=name, code="invalid_request")
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(f"`{name}` must be between {low} and {high}" if high is not None
                       else f"`{name}` must be at least {low}", param=name, code="invalid_request")
    return value


@router.get("/v1/features/{layer}/{index}", response_model=Feature, response_model_exclude_unset=True)
async def feature(layer: int, index: int, request: Request) -> dict[str, Any]:
    context = _context(request)
    _require_saes(context)
    info = _loaded_layer(context, layer, "layer", status=HTTPStatus.NOT_FOUND)
    index_in_range(info["d_sae"], layer, index, "index", status=HTTPStatus.NOT_FOUND)
    report = rpc.first_reply(await context.engine.collective_rpc(rpc.FEATURE_REPORT, args=(layer, index, LENS_TOP)))
    tokenizer = context.engine.get_tokenizer()
    lens = {
        side: [{"token_id": t, "token": _token_text(tokenizer, t), "logit": v} for t, v in report[side]]
        for side in ("promoted", "suppressed")
    }
    return {"object": "feature", "layer": layer, "index": index, "d_model": info["d_model"],
            "decoder_norm": report["decoder_norm"], "encoder_norm": report["encoder_norm"],
            "encoder_decoder_cosine": report["encoder_decoder_cosine"], "logit_lens": lens,
            **_label_fields(context, layer, index),
            **(await _dashboard_fields(context, layer, index) if context.dashboards is not None else {})}


async def _dashboard_fields(context, layer: int, index: int) -> dict:
    fields = await context.dashboards.fields(layer, index)
    explanation = await context.dashboards.read(explanation_store.served, layer, index)
    return fields | {"explanation": explanation} if explanation else fields
