"""What a steered or traced response takes from the workers, and when.

The workers keep a request's results until the API takes them: a gated spec's gate report
(folded into the `steering` echo), its trace per choice, and whether a worker refused its spec.
A JSON response takes them all once the request is done; a stream takes its refusal check
before its first event and its trace pieces with each chunk. Whatever a response asked the
workers to keep and did not take is discarded by the middleware when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from steerserve_sae.protocol.rpc import CAPTURES, GATE_REPORTS, REJECTIONS, Wanted, merge_gate_reports, trace_key

from steerserve.errors import APIError
from steerserve.steering.traces import num_choices, take_traces

logger = logging.getLogger("vllm.steerserve")


@dataclass
class ResponseEnd:
    """What only the end of a response can say: top-level fields, and fields per choice index."""

    fields: dict[str, Any] = field(default_factory=dict)
    per_choice: dict[int, dict[str, Any]] = field(default_factory=dict)
    rejected: APIError | None = None  # a worker refused the request's spec: answer this instead


def _rejection_error(reason: str) -> APIError:
    logger.error("steerserve: a worker refused a spec the API signed (%s); failing the request. Every vLLM "
                 "process must share the deployment's STEERSERVE_SPEC_SECRET (see the start-up log)", reason)
    return APIError(f"a worker refused this request's steering/trace spec ({reason}); this is a deployment "
                    "misconfiguration (every vLLM process must share STEERSERVE_SPEC_SECRET), not a problem with "
                    "the request", code="spec_rejected_by_worker", status=500, type="server_error")


def trace_keys(trace, choices: int) -> list[Wanted]:
    return [(CAPTURES, trace_key(trace.id, c)) for c in range(choices)] if trace is not None else []


def asked_keys(translation) -> list[Wanted]:
    """What the workers keep for this request until the API takes it."""
    keys = trace_keys(translation.trace, num_choices(translation.body))
    if translation.gate_report is not None:
        keys.append((GATE_REPORTS, translation.gate_report))
    if translation.ticket is not None:
        keys.append((REJECTIONS, translation.ticket))
    return keys


async def _take_rejection(context, ticket: str) -> APIError | None:
    reasons = [r for r in await context.takes.take(REJECTIONS, ticket) if r]
    return _rejection_error(reasons[0]) if reasons else None


def stream_rejection(context, translation, untaken: set[Wanted]) -> Callable[[], Awaitable[APIError | None]] | None:
    """For a stream: taken before its first event goes out (the worker read the spec in the step
    that computed the first token, before that token reached the API)."""
    if translation.ticket is None or not translation.body.get("stream"):
        return None

    async def rejection() -> APIError | None:
        untaken.discard((REJECTIONS, translation.ticket))
        return await _take_rejection(context, translation.ticket)

    return rejection


def response_end(context, translation, untaken: set[Wanted]) -> Callable[[], Awaitable[ResponseEnd]] | None:
    """Taken from the workers once the request is done: a gated spec's gate report, folded into
    its echo, the request's trace per choice, and (not for streams, which check before their
    first event) whether a worker refused the spec. A result that outgrew the workers' store
    (worker_takes.store_full_error) becomes the response's error."""
    spec, report, trace = translation.spec, translation.gate_report, translation.trace
    ticket = None if translation.body.get("stream") else translation.ticket
    if report is None and trace is None and ticket is None:
        return None
    choices = num_choices(translation.body)

    async def end() -> ResponseEnd:
        untaken.clear()  # every take below goes out at once, whatever fails
        result = ResponseEnd()

        async def gate_report() -> None:
            per_rank = await context.takes.take(GATE_REPORTS, report)
            result.fields["steering"] = spec.echo(merge_gate_reports(per_rank), translation.vector_names)

        async def traces() -> None:
            taken = await take_traces(context, trace, choices, whole=not translation.body.get("stream"))
            result.per_choice = {i: {"trace": taken.get(i, [])} for i in range(choices)}

        async def rejection() -> None:
            result.rejected = await _take_rejection(context, ticket)

        # at once, so that all go in one worker RPC (server/steerserve/steering/worker_takes.py)
        outcomes = await asyncio.gather(*(take() for take, asked in ((gate_report, report), (traces, trace),
                                                                      (rejection, ticket)) if asked is not None),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, APIError):
                raise outcome
        errors = [o for o in outcomes if isinstance(o, APIError)]
        result.rejected = result.rejected or (errors[0] if errors else None)
        return result

    return end


def trace_pieces(context, translation) -> Callable[[], Awaitable[dict[int, list[dict]]]] | None:
    """For a traced stream: the entries recorded since the last take, per choice, taken with
    each chunk (the position that predicted a token is computed before the token is sent)."""
    trace = translation.trace
    if trace is None or not translation.body.get("stream"):
        return None
    choices = num_choices(translation.body)

    async def pieces() -> dict[int, list[dict]]:
        return await take_traces(context, trace, choices, whole=False)

    return pieces
