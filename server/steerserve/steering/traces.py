"""The `trace` field of chat/text completions: each token's top SAE features while it generates.

`"trace": {"layers": [...], "top_k": 5, "positions": "generation" | "all"}` rides to the workers
as a capture spec (sae_plugins/steerserve_sae/capture/features.py) next to any steering, so the features are
those of the stream the request really ran, after any steering edit at each traced layer, and
only the traced requests' rows are encoded. A position's features are recorded when the
position is computed: position p holds the token at p as input and predicts token p + 1. So
trace entry i of "generation" is the position that predicted generated token i (the last prompt
position for the first), one entry per generated token; "all" adds the prompt positions before
it, so its last entries align with the generated tokens the same way. The API takes the trace
per choice once the response is complete.

`"residuals": true` adds each entry's stream vectors (the SAE's input at each traced layer, after
any edit there) for probing, encoded as RESIDUAL_ENCODING (steerserve_sae.protocol.capture). Their number,
positions x layers x choices, is bounded before the request runs by --max-trace-residuals, with
every token budget vLLM will apply: the output-token field it reads (chat: `max_completion_tokens`,
else `max_tokens`; completions: `max_tokens`) and the context left after the prompt (whose tokens
are counted first for positions "all"). An entry whose residual was not recorded says so (null).
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, ValidationError

from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.rpc import CAPTURE_KEY, CAPTURES, merge_layers, trace_key

from steerserve.errors import APIError, from_validation
from steerserve.limits import MAX_TOP_K
from steerserve.middleware.guard import as_vllm_reads_int
from steerserve.prompt_tokens import prompt_token_ids
from steerserve.steering.sae_checks import loaded_layer

MAX_CHOICES = 128  # most choices (`n`) a traced request may ask for


class TraceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[StrictInt] = Field(min_length=1)
    top_k: StrictInt = 5
    positions: Literal["generation", "all"] = "generation"
    residuals: StrictBool = False
    _residual_positions: int = PrivateAttr(default=0)  # per choice and layer, set by parse_trace


def parse_trace(raw: object, sae_sizes: dict[int, int], body: dict, max_features: int, max_residuals: int = 0,
                prompt_tokens: int | None = None, max_model_len: int | None = None) -> TraceRequest:
    """The validated trace; `max_features` bounds layers x top_k (--max-trace-features),
    `max_residuals` the residual vectors (--max-trace-residuals), given the context length and
    the prompt's token count for a trace of all positions with residuals (prompt_tokens_for_residuals)."""
    if not sae_sizes:
        raise APIError("trace is unavailable: this server was started without --sae", param="trace",
                       code="steering_unavailable")
    try:
        trace = TraceRequest.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, prefix="invalid trace", code="invalid_trace", root="trace") from None
    for i, layer in enumerate(trace.layers):
        loaded_layer(sae_sizes, layer, f"trace.layers[{i}]")
        if layer in trace.layers[:i]:
            raise APIError(f"layer {layer} is listed twice", param=f"trace.layers[{i}]", code="invalid_trace")
    if not 1 <= trace.top_k <= min(MAX_TOP_K, *(sae_sizes[layer] for layer in trace.layers)):
        raise APIError(f"top_k must be between 1 and {MAX_TOP_K} (and at most d_sae)", param="trace.top_k",
                       code="invalid_trace")
    if len(trace.layers) * trace.top_k > max_features:
        raise APIError(f"a trace returns at most {max_features} features per position (layers x top_k) on this "
                       "server (--max-trace-features)", param="trace.top_k", code="invalid_trace")
    n = as_vllm_reads_int(body.get("n"))
    if n is not None and n > MAX_CHOICES:
        raise APIError(f"a traced request may ask for at most {MAX_CHOICES} choices (n)", param="n",
                       code="invalid_trace")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        raise APIError("trace takes one prompt per request (a string or a list of token ids)", param="prompt",
                       code="invalid_trace")
    if trace.residuals:
        trace._residual_positions = _residual_positions(trace, body, max_residuals, prompt_tokens, max_model_len)
    return trace


def _generated_tokens(body: dict, prompt_tokens: int | None, max_model_len: int | None) -> int:
    """The most tokens vLLM generates per choice: the field it reads, within the context left
    after the prompt (the whole context when the prompt is not counted); the context alone when
    no field is set (for completions vLLM then stops earlier, at its default)."""
    chat = "messages" in body  # chat completions, or /invocations in the chat form
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    room = max_model_len - (prompt_tokens or 0) if max_model_len else None
    if body.get(name) is None and room is not None:
        return room
    asked = as_vllm_reads_int(body.get(name))
    if asked is None or asked < 1:
        raise APIError(f"trace.residuals needs {name} as a positive integer, so the number of vectors is known "
                       "before the request runs", param="trace.residuals", code="invalid_trace")
    return asked if room is None else min(asked, room)


def _residual_positions(trace: TraceRequest, body: dict, max_residuals: int, prompt_tokens: int | None,
                        max_model_len: int | None) -> int:
    """Positions per choice and layer whose residuals the trace returns, within the limit."""
    positions = _generated_tokens(body, prompt_tokens, max_model_len) + (
        (prompt_tokens or 0) if trace.positions == "all" else 0)
    steering = body.get("steering")
    answers = 2 if isinstance(steering, dict) and steering.get("compare") is True else 1  # compare: a traced baseline
    vectors = positions * len(trace.layers) * num_choices(body) * answers
    if vectors > max_residuals:
        raise APIError(f"this trace would return up to {vectors} residual vectors (positions x layers x choices, "
                       "twice with steering.compare; positions count every token the request may generate, "
                       "so set max_tokens); "
                       f"this server returns at most {max_residuals} per request (--max-trace-residuals)",
                       param="trace.residuals", code="invalid_trace")
    return positions


async def prompt_tokens_for_residuals(context, payload: object) -> int | None:
    """The prompt's token count when a trace of all positions asks for residuals (else None), by
    the server's one counter (prompt_tokens.py): a prompt whose tokens do not fit the context, or
    that vLLM cannot render, is a 400 before the request runs."""
    raw = payload.get("trace") if isinstance(payload, dict) else None
    if not (isinstance(raw, dict) and raw.get("residuals") is True and raw.get("positions") == "all"):
        return None
    field = "messages" if "messages" in payload else "prompt"  # chat completions, or /invocations in the chat form
    token_ids = await prompt_token_ids(context, payload, field, context.max_model_len)
    return None if token_ids is None else len(token_ids)


def attach_trace(body: dict, trace: TraceRequest) -> CaptureSpec:
    """Adds the trace's capture spec to `body` (the vLLM request); returns it."""
    capture = CaptureSpec(id=uuid.uuid4().hex, layers=tuple(trace.layers), top_k=trace.top_k, trace=True,
                          generation_only=trace.positions == "generation", residuals=trace._residual_positions)
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), CAPTURE_KEY: capture.to_extra_arg()}
    if trace.positions == "all":  # every prompt position must really be computed, not read from the cache
        body["cache_salt"] = f"{body['cache_salt']}:trace-{capture.id}" if body.get("cache_salt") else \
            f"trace-{capture.id}"
    return capture


def num_choices(body: dict) -> int:
    """The choices vLLM generates (parse_trace refused more than MAX_CHOICES for a trace)."""
    n = as_vllm_reads_int(body.get("n")) if body.get("n") is not None else None
    return min(n, MAX_CHOICES) if n is not None and n > 0 else 1


async def take_traces(context, capture: CaptureSpec, choices: int, whole: bool = True) -> dict[int, list[dict]]:
    """Per choice index, the trace entries recorded and not yet taken, in position order:
    {"position", "features": {layer: [{"index", "activation", "label"?}]}, "residuals"?: {layer: str}}.
    A stream takes its
    trace piece by piece (whole=False); the whole of a trace lets choices share prompt entries."""
    per_choice = await context.takes.take_many([(CAPTURES, trace_key(capture.id, c)) for c in range(choices)])
    by_choice = {choice: merge_layers(per_rank) for choice, per_rank in enumerate(per_choice)
                 if any(rank is not None for rank in per_rank)}  # choice -> layer -> the worker's result
    positions: dict[int, dict[int, dict]] = {}  # choice -> position -> entry
    for choice, layers in by_choice.items():
        entries = positions.setdefault(choice, {})
        for layer, result in layers.items():
            residuals = result.get("residuals") or [None] * len(result["positions"])
            for position, indices, values, residual in zip(result["positions"], result["indices"], result["values"],
                                                           residuals):
                entry = entries.setdefault(position, {"position": position, "features": {}})
                entry["features"][str(layer)] = [_feature(context, layer, i, v) for i, v in zip(indices, values)]
                if capture.residuals:  # null: not recorded (never expected: the bound counts every position)
                    entry.setdefault("residuals", {})[str(layer)] = residual
    if whole and not capture.generation_only and len(positions) > 1:
        # The choices share the prompt: prompt positions one choice read from the prefix cache
        # (all those before its first computed one) another choice computed, with equal features.
        shared: dict[int, dict] = {}
        for entries in positions.values():
            for position, entry in entries.items():
                shared.setdefault(position, entry)
        for entries in positions.values():
            first = min(entries)
            entries.update({position: entry for position, entry in shared.items() if position < first})
    return {choice: [entries[p] for p in sorted(entries)] for choice, entries in positions.items()}


def _feature(context, layer: int, index: int, activation: float) -> dict:
    label = context.labels.get(layer, index)
    return {"index": index, "activation": activation} | ({"label": label.label} if label is not None else {})
