"""ASGI middleware: guards every JSON request body, and adds `steering` to the completion routes.

Every POST/PUT/PATCH body except multipart uploads is read here once, the way the handler will
read it (body_reading.py: one Content-Type, declared JSON), bounded in size, parsed with a bounded
depth, and checked for the plugin's reserved `vllm_xargs` keys and the client priority range
(request_guard.py), so no route of vLLM's or ours can hand the workers an unchecked spec, let a
client jump the queue, or crash on hostile JSON.
On the steerable routes the body is then validated and translated (request_translation.py),
and the response, JSON or server-sent events, gets the normalised spec echoed back; any other
route refuses a `steering` field rather than ignore it. Unsteered requests pass through with
their body untouched. For a spec with gates, the echo at the end of the response (the JSON body,
or one last chunk before a stream's `[DONE]`) also says how many tokens each gate let through;
a `trace` (server/steering/traces.py) arrives there too, per choice. A worker that refused the request's
spec (sae_plugins/capture/rejections.py) turns the response into a 500: before a stream's first event,
or instead of the JSON body, so an unsteered answer never goes out labelled as steered.
Whatever the workers keep for a response (gate report, traces, refusal) and the response did not
take, because its client left, its status was an error or it was cancelled, is discarded when
it ends, so the workers' store frees it; a result that outgrew that store is a 503 (or, mid-stream,
an error event).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerserve_sae.capture.features import trace_key
from steerserve_sae.vllm_hooks.worker_extension import CAPTURES, GATE_REPORTS, REJECTIONS

from steerserve.middleware.body_reading import BodyChannel, check_headers, read_json_body, reads_json, refuse
from steerserve.errors import APIError
from steerserve.middleware.guard import (
    check_cache_salt, check_priority, check_route_takes_steering, check_vllm_xargs, is_steerable, parse_json_body,
)
from steerserve.steering.translation import translate_request
from steerserve.steering.traces import num_choices, prompt_tokens_for_residuals, take_traces
from steerserve.steering.worker_takes import Wanted

logger = logging.getLogger("vllm.steerserve")


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hands the (rewritten) body over once, then the real channel: vLLM watches it to cancel
    generation when the client disconnects."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_length(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


class SteeringMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            # A scrape shows the last snapshot of the workers' counters and asks for a new one
            # (debounced), so counters also move while only unsteered traffic runs.
            scope["app"].state.steerserve.metrics.schedule_refresh()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = scope["app"].state.steerserve
        channel = BodyChannel(receive)
        reading = reads_json(scope)
        try:
            check_headers(scope)
            body, payload = await self._read_checked(scope, channel, context.limits) if reading else (b"", None)
        except APIError as error:
            await refuse(error, scope, channel, send, context.limits.max_request_bytes)
            return
        if not reading:
            await self.app(scope, receive, send)
            return
        translation = None
        if isinstance(payload, dict) and is_steerable(scope["path"]):
            try:
                prompt_tokens = await prompt_tokens_for_residuals(context, payload)
                translation = translate_request(payload, context.sae_sizes, context.max_features, context.limits,
                                                context.sae_stages, prompt_tokens, context.max_model_len,
                                                context.d_model)
            except APIError as error:
                context.metrics.validation_error(error.code)
                await error.response()(scope, _replay(b"", receive), send)
                return
        if translation is None or not translation.extended:
            if translation is not None and translation.body_changed:  # a `"steering": null` was dropped
                body = json.dumps(translation.body).encode()
            await self.app(_with_length(scope, body), _replay(body, receive), send)
            return
        await self._extended(scope, receive, send, context, translation)

    async def _read_checked(self, scope: Scope, receive: BodyChannel, limits) -> tuple[bytes, Any]:
        """The body and its parsed JSON (None when empty), after every check that applies to
        any route."""
        body = await read_json_body(scope, receive, limits.max_request_bytes)
        if not body.strip():
            return body, None
        payload = parse_json_body(body, limits.max_json_depth)
        if isinstance(payload, dict):
            check_vllm_xargs(payload)
            check_priority(payload, limits.client_priority_range)
            if is_steerable(scope["path"]):
                check_cache_salt(payload)
            else:
                check_route_takes_steering(scope["path"], payload)
        return body, payload

    async def _extended(self, scope: Scope, receive: Receive, send: Send, context, translation) -> None:
        """A steered and/or traced request: the response gets the echo, the baseline, the gate
        report and the traces. What it asked the workers to keep and did not take is discarded."""
        untaken: set[Wanted] = set()
        try:
            await self._respond_extended(scope, receive, send, context, translation, untaken)
        finally:
            if untaken:
                context.takes.discard(sorted(untaken))

    async def _respond_extended(self, scope: Scope, receive: Receive, send: Send, context, translation,
                                untaken: set[Wanted]) -> None:
        spec = translation.spec
        additions: dict[str, Any] = {"steering": spec.echo()} if spec is not None else {}
        if translation.baseline_body is not None:
            baseline = json.dumps(translation.baseline_body).encode()
            baseline_keys = _trace_keys(translation.baseline_trace, num_choices(translation.baseline_body))
            untaken.update(baseline_keys)
            start, content = await self._collect(_with_length(scope, baseline), _replay(baseline, receive))
            if start["status"] != 200:  # the unsteered twin failed: that answer stands
                await send(start)
                await send({"type": "http.response.body", "body": content, "more_body": False})
                return
            additions["baseline"] = json.loads(content)
            if translation.baseline_trace is not None:
                untaken.difference_update(baseline_keys)
                try:
                    traces = await take_traces(context, translation.baseline_trace,
                                               num_choices(translation.baseline_body))
                except APIError as error:  # the workers' store was full: nothing has been sent yet
                    await error.response()(scope, _replay(b"", receive), send)
                    return
                for choice in additions["baseline"].get("choices", []):
                    choice["trace"] = traces.get(choice.get("index"), [])
        new_body = json.dumps(translation.body).encode()
        untaken.update(_asked_keys(translation))
        echoing = _EchoingSend(send, additions, _response_end(context, translation, untaken),
                               _trace_pieces(context, translation), _stream_rejection(context, translation, untaken))
        if spec is None:
            await self.app(_with_length(scope, new_body), _replay(new_body, receive), echoing)
            return
        context.metrics.steered_request()
        try:
            async with context.admission.admit(spec.id):
                await self.app(_with_length(scope, new_body), _replay(new_body, receive), echoing)
        finally:
            context.metrics.schedule_refresh()

    async def _collect(self, scope: Scope, receive: Receive) -> tuple[Message, bytes]:
        """Runs the app to completion and returns its response start message and body."""
        messages: list[Message] = []

        async def collect(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, collect)
        start = next(m for m in messages if m["type"] == "http.response.start")
        return start, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


@dataclass
class _ResponseEnd:
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


def _trace_keys(trace, choices: int) -> list[Wanted]:
    return [(CAPTURES, trace_key(trace.id, c)) for c in range(choices)] if trace is not None else []


def _asked_keys(translation) -> list[Wanted]:
    """What the workers keep for this request until the API takes it."""
    keys = _trace_keys(translation.trace, num_choices(translation.body))
    if translation.gate_report is not None:
        keys.append((GATE_REPORTS, translation.gate_report))
    if translation.ticket is not None:
        keys.append((REJECTIONS, translation.ticket))
    return keys


async def _take_rejection(context, ticket: str) -> APIError | None:
    reasons = [r for r in await context.takes.take(REJECTIONS, ticket) if r]
    return _rejection_error(reasons[0]) if reasons else None


def _stream_rejection(context, translation, untaken: set[Wanted]) -> Callable[[], Awaitable[APIError | None]] | None:
    """For a stream: taken before its first event goes out (the worker read the spec in the step
    that computed the first token, before that token reached the API)."""
    if translation.ticket is None or not translation.body.get("stream"):
        return None

    async def rejection() -> APIError | None:
        untaken.discard((REJECTIONS, translation.ticket))
        return await _take_rejection(context, translation.ticket)

    return rejection


def _response_end(context, translation, untaken: set[Wanted]) -> Callable[[], Awaitable[_ResponseEnd]] | None:
    """Taken from the workers once the request is done: a gated spec's gate report, folded into
    its echo, the request's trace per choice, and (not for streams, which check before their
    first event) whether a worker refused the spec. A result that outgrew the workers' store
    (worker_takes.store_full_error) becomes the response's error."""
    spec, report, trace = translation.spec, translation.gate_report, translation.trace
    ticket = None if translation.body.get("stream") else translation.ticket
    if report is None and trace is None and ticket is None:
        return None
    choices = num_choices(translation.body)

    async def end() -> _ResponseEnd:
        untaken.clear()  # every take below goes out at once, whatever fails
        result = _ResponseEnd()

        async def gate_report() -> None:
            per_rank = await context.takes.take(GATE_REPORTS, report)
            result.fields["steering"] = spec.echo(_merged_gate_reports(per_rank))

        async def traces() -> None:
            taken = await take_traces(context, trace, choices, whole=not translation.body.get("stream"))
            result.per_choice = {i: {"trace": taken.get(i, [])} for i in range(choices)}

        async def rejection() -> None:
            result.rejected = await _take_rejection(context, ticket)

        # at once, so that all go in one worker RPC (server/steering/worker_takes.py)
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


def _trace_pieces(context, translation) -> Callable[[], Awaitable[dict[int, list[dict]]]] | None:
    """For a traced stream: the entries recorded since the last take, per choice, taken with
    each chunk (the position that predicted a token is computed before the token is sent)."""
    trace = translation.trace
    if trace is None or not translation.body.get("stream"):
        return None
    choices = num_choices(translation.body)

    async def pieces() -> dict[int, list[dict]]:
        return await take_traces(context, trace, choices, whole=False)

    return pieces


def _merged_gate_reports(per_rank: list[dict | None]) -> dict:
    """One report from every rank's: with tensor parallelism the ranks agree; with pipeline
    parallelism each stage counts the gates on its own layers (the others read 0)."""
    reports = [r for r in per_rank if r]
    if not reports:
        return {"tokens": 0, "passed": []}
    return {"tokens": max(r["tokens"] for r in reports),
            "passed": [max(counts) for counts in zip(*(r["passed"] for r in reports))]}


class _EchoingSend:
    """Adds `additions` (the `steering` echo, and `baseline` for compare) to a JSON body or to
    every `data:` event of a stream. `final`, when given, makes the additions of the end of the
    response: merged into the JSON body, or sent as one more chunk before the stream's `[DONE]`.
    `trace_pieces`, for a traced stream: each chunk's choice carries the trace entries recorded
    since the previous chunk (the last chunk the rest), so the stream's pieces add up to the trace."""

    def __init__(self, send: Send, additions: dict[str, Any],
                 final: Callable[[], Awaitable[_ResponseEnd]] | None = None,
                 trace_pieces: Callable[[], Awaitable[dict[int, list[dict]]]] | None = None,
                 rejection: Callable[[], Awaitable[APIError | None]] | None = None):
        self._send = send
        self._additions = additions
        self._final = final
        self._trace_pieces = trace_pieces
        self._rejection = rejection  # a stream's check, before its first event
        self._pending_traces: dict[int, list[dict]] = {}  # taken, not yet sent
        self._start: Message | None = None
        self._mode = "passthrough"
        self._buffer = b""
        self._last_chunk: dict[str, Any] = {}  # the stream's last data event

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            content_type = headers.get(b"content-type", b"").decode()
            if message["status"] == 200 and content_type.startswith("application/json"):
                self._mode, self._start = "json", message  # sent once the body is rewritten
                return
            if message["status"] == 200 and content_type.startswith("text/event-stream"):
                self._mode = "sse"
                if self._rejection is not None:
                    self._start = message  # sent with the first event, once the workers accepted the spec
                    return
            await self._send(message)
            return
        if self._mode == "rejected":  # the client has its error; the rest of the stream goes nowhere
            return
        if message["type"] != "http.response.body" or self._mode == "passthrough":
            await self._send(message)
            return
        if self._mode == "sse" and self._start is not None:
            start, self._start = self._start, None
            assert self._rejection is not None
            rejected = await self._rejection()
            if rejected is not None:
                self._mode = "rejected"
                await self._send_error(rejected)
                return
            await self._send(start)
        self._buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self._mode == "json":
            if more:
                return
            end = await self._final() if self._final is not None else _ResponseEnd()
            if end.rejected is not None:
                await self._send_error(end.rejected)
                return
            self._additions = {**self._additions, **end.fields}
            body = self._with_additions(self._buffer, end.per_choice)
            assert self._start is not None
            headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self._send({**self._start, "headers": headers})
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        events, _, rest = self._buffer.rpartition(b"\n\n")
        self._buffer = rest
        try:
            if self._trace_pieces is not None and events:
                for choice, entries in (await self._trace_pieces()).items():
                    self._pending_traces.setdefault(choice, []).extend(entries)
            out = b"".join([await self._sse_event(e) + b"\n\n" for e in events.split(b"\n\n")]) if events else b""
            if not more and rest:
                out += await self._sse_event(rest)
                self._buffer = b""
        except APIError as error:  # mid-stream: the status is sent, so an error event ends the stream
            self._mode = "rejected"
            body = b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await self._send({"type": "http.response.body", "body": out, "more_body": more})

    async def _send_error(self, error: APIError) -> None:
        body = json.dumps(error.body()).encode()
        await self._send({"type": "http.response.start", "status": error.status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _with_additions(self, raw: bytes, per_choice: dict[int, dict[str, Any]] | None = None) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict):
            self._last_chunk = data
            data.update(self._additions)
            for choice in data.get("choices", []) if per_choice else ():
                choice.update(per_choice.get(choice.get("index"), {}))
            for choice in data.get("choices", []) if self._trace_pieces is not None else ():
                choice["trace"] = self._pending_traces.pop(choice.get("index"), [])
        return json.dumps(data).encode()

    async def _sse_event(self, event: bytes) -> bytes:
        prefix = b"data: "
        if not event.startswith(prefix):
            return event
        if event[len(prefix):].strip() != b"[DONE]":
            return prefix + self._with_additions(event[len(prefix):])
        if self._final is None:
            return event
        # One last chunk, like a usage chunk: the end-of-response fields, and per choice an empty
        # delta (or text) carrying that choice's trace.
        last = {key: self._last_chunk[key] for key in ("id", "object", "created", "model") if key in self._last_chunk}
        end = await self._final()
        if end.rejected is not None:
            raise end.rejected
        empty = {"delta": {}} if last.get("object") == "chat.completion.chunk" else {"text": ""}
        for i, entries in self._pending_traces.items():  # taken with the last chunks, not yet sent
            end.per_choice.setdefault(i, {"trace": []})["trace"][:0] = entries
        choices = [{"index": i, **empty, "finish_reason": None, **fields} for i, fields in sorted(end.per_choice.items())]
        final = json.dumps({**last, "choices": choices, **self._additions, **end.fields}).encode()
        return prefix + final + b"\n\n" + event
