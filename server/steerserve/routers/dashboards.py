"""`POST /v1/features/dashboards`: one batch of documents folded into feature dashboards.

What `steerserve dashboards` (server/steerserve/analysis/dashboards.py) sends, a batch at a time. Every
document runs concurrently as a prompt-only, one-token completion through this server's own app
(like inspect), all under one dashboard capture (protocol/capture.py: DashboardSpec) with the
document's number; the workers fold every position into bounded per-feature accumulators
(sae_plugins/steerserve_sae/capture/dashboards.py) and the batch's accumulators are taken once it has run.
The reply holds, per layer, the rows of the features that fired as base64 little-endian arrays
(DASHBOARD_ARRAYS), and each document's tokens as text, so the client can show the windows.
Documents may name a `group` (e.g. their language): the reply then also counts, per group and
feature, its firings on the group's word pieces (tokens with a letter) and the word pieces seen.
With data parallelism each engine ran some of the documents; their parts are merged into one
(protocol/dashboard_merge.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from steerserve_sae.protocol.capture import DASHBOARD_BOUNDS, MAX_DOC, CaptureSpec, DashboardSpec
from steerserve_sae.protocol.dashboard_merge import merge_dashboard_layers
from steerserve_sae.protocol.rpc import CAPTURE_KEY, CAPTURES

from steerserve.errors import APIError
from steerserve.prompt_tokens import chat_prompt_ids
from steerserve.routers.route import SteerserveRoute
from steerserve.routers.features import _context, _loaded_layer, _require_saes, _special_ids, _token_text

router = APIRouter(route_class=SteerserveRoute)
MAX_DOCUMENTS = 1024  # per batch: the workers' accumulators are per batch, the documents run at once


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictInt = Field(ge=0, le=MAX_DOC)
    prompt: StrictStr | None = None
    messages: list[dict] | None = None
    group: StrictStr | None = Field(default=None, min_length=1, max_length=200)


class DashboardBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[StrictInt] = Field(min_length=1)
    documents: list[Document] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: StrictInt = Field(default=20, ge=DASHBOARD_BOUNDS["top_n"][0], le=DASHBOARD_BOUNDS["top_n"][1])
    before: StrictInt = Field(default=16, ge=DASHBOARD_BOUNDS["before"][0], le=DASHBOARD_BOUNDS["before"][1])
    after: StrictInt = Field(default=7, ge=DASHBOARD_BOUNDS["after"][0], le=DASHBOARD_BOUNDS["after"][1])
    bins: StrictInt = Field(default=56, ge=DASHBOARD_BOUNDS["bins"][0], le=DASHBOARD_BOUNDS["bins"][1])
    low: StrictFloat = 1e-3  # histogram edges: DashboardSpec.problem says what the workers can bin
    high: StrictFloat = 1e4


@router.post("/v1/features/dashboards")
async def dashboard_batch(request: Request, req: DashboardBatch) -> dict:
    context = _context(request)
    _require_saes(context)
    for i, layer in enumerate(req.layers):
        _loaded_layer(context, layer, f"layers[{i}]")
    problem = DashboardSpec(0, req.top_n, req.before, req.after, req.bins, req.low, req.high).problem()
    if problem is not None:
        raise APIError(problem[1], param=problem[0], code="invalid_request")
    if len({d.id for d in req.documents}) != len(req.documents):
        raise APIError("document ids must be distinct", param="documents", code="invalid_request")
    for i, doc in enumerate(req.documents):
        if (doc.prompt is None) == (doc.messages is None):
            raise APIError("give exactly one of `prompt` or `messages`", param=f"documents[{i}]",
                           code="invalid_request")
    ids = await asyncio.gather(*(_token_ids(context, doc) for doc in req.documents))
    groups = sorted({d.group for d in req.documents if d.group is not None})
    spec = DashboardSpec(0, req.top_n, req.before, req.after, req.bins, req.low, req.high, len(groups))
    capture_id = uuid.uuid4().hex
    tokenizer = context.engine.get_tokenizer()
    special_ids = _special_ids(tokenizer)
    letters = await asyncio.to_thread(_word_pieces, tokenizer, {t for d, tokens in zip(req.documents, ids)
                                                                 if d.group is not None for t in tokens})

    def dashboard(doc: Document, tokens: list[int]) -> DashboardSpec:
        if doc.group is None:
            return DashboardSpec(doc.id, *_fields(spec))
        return DashboardSpec(doc.id, *_fields(spec), groups.index(doc.group),
                             frozenset(i for i, t in enumerate(tokens) if t not in letters))

    taken = False
    try:
        statuses = await asyncio.gather(*(
            _run(context, CaptureSpec(capture_id, tuple(sorted(set(req.layers))), 1,
                                      frozenset(i for i, t in enumerate(tokens) if t in special_ids),
                                      dashboard=dashboard(doc, tokens)), tokens)
            for doc, tokens in zip(req.documents, ids)))
        failed = next((s for s in statuses if s is not None), None)
        if failed is not None:
            raise APIError(f"a document failed to run: {failed}", code="document_failed", status=500,
                           type="server_error")
        taken = True
        per_rank = await context.takes.take(CAPTURES, capture_id)
    finally:
        if not taken:
            context.takes.discard([(CAPTURES, capture_id)])
    layers = merge_dashboard_layers(per_rank)
    texts = await asyncio.to_thread(lambda: {str(d.id): [_token_text(tokenizer, t) for t in tokens]
                                             for d, tokens in zip(req.documents, ids)})
    return {"object": "feature_dashboard_batch", "histogram_edges": spec.histogram_edges(),
            "layers": {str(layer): _encoded(result) for layer, result in layers.items()},
            "documents": texts, "groups": groups, "truncated": [d.id for d, t in zip(req.documents, ids) if t.truncated]}


class _Tokens(list):
    truncated: bool = False


async def _token_ids(context, doc: Document) -> _Tokens:
    """The document's prompt ids, cut to what fits the context beside the one generated token."""
    if doc.messages is not None:
        ids = await chat_prompt_ids(context.client, context.served_model,
                                    {"messages": doc.messages, "add_generation_prompt": False})
    else:
        ids = await asyncio.to_thread(context.engine.get_tokenizer().encode, doc.prompt)
    limit = context.max_model_len - 1
    tokens = _Tokens(ids[:limit])
    tokens.truncated = len(ids) > limit
    return tokens


def _fields(spec: DashboardSpec) -> tuple:
    return spec.top_n, spec.before, spec.after, spec.bins, spec.low, spec.high, spec.groups


def _word_pieces(tokenizer, ids: set[int]) -> set[int]:
    """The ids whose text has a letter: a group's tokens are its word pieces (punctuation,
    digits, whitespace and specials belong to no language)."""
    return {t for t in ids if any(c.isalpha() for c in _token_text(tokenizer, t))}


async def _run(context, capture: CaptureSpec, tokens: list[int]) -> str | None:
    """One document's forward; None when it ran, else why not."""
    if not tokens:
        return None
    body = {"model": context.served_model, "prompt": list(tokens), "max_tokens": 1, "temperature": 0,
            "vllm_xargs": {CAPTURE_KEY: capture.to_extra_arg()},
            # per document, so every position is computed (a shared prefix would be skipped)
            "cache_salt": f"dashboard-{capture.id}-{capture.dashboard.doc}"}
    response = await context.client.post("/v1/completions", content=json.dumps(body),
                                         headers={"content-type": "application/json"})
    return None if response.status_code == 200 else response.text[:300]


def _encoded(result: dict) -> dict:
    return {key: base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
            for key, value in result.items()}
