"""The response side of a steered or traced request: the echo and end-of-response fields
written into a JSON body or into a stream's events, and a worker's refusal turned into the
response's error (server/steerserve/middleware/response_end.py says what is taken from the workers)."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from starlette.types import Message, Send

from steerserve.errors import APIError
from steerserve.middleware.api_shapes import COMPLETIONS, CompletionsShape
from steerserve.middleware.response_end import ResponseEnd


class EchoingSend:
    """Adds `additions` (the `steering` echo, and `baseline` for compare) to a JSON body or to
    every `data:` event of a stream. `final`, when given, makes the additions of the end of the
    response: merged into the JSON body, or sent as one more chunk before the stream's `[DONE]`.
    `trace_pieces`, for a traced stream: each chunk's choice carries the trace entries recorded
    since the previous chunk (the last chunk the rest), so the stream's pieces add up to the trace.
    `shape`: where the API keeps the echo in its stream's events (api_shapes.py)."""

    def __init__(self, send: Send, additions: dict[str, Any],
                 final: Callable[[], Awaitable[ResponseEnd]] | None = None,
                 trace_pieces: Callable[[], Awaitable[dict[int, list[dict]]]] | None = None,
                 rejection: Callable[[], Awaitable[APIError | None]] | None = None,
                 shape: CompletionsShape = COMPLETIONS):
        self._send = send
        self._shape = shape
        self._additions = additions
        self._final = final
        self._trace_pieces = trace_pieces
        self._rejection = rejection  # a stream's check, before its first event
        self._pending_traces: dict[int, list[dict]] = {}  # taken, not yet sent
        self._start: Message | None = None
        self._mode = "passthrough"
        self._buffer = b""
        self._held = b""  # a stream's events from before its first token, until the refusal check
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
            held = self._held + message.get("body", b"")
            if message.get("more_body", False) and self._shape.before_generation(held):
                self._held = held  # the worker reads the spec with the first token: check after it
                return
            message, self._held = {**message, "body": held}, b""
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
            end = await self._final() if self._final is not None else ResponseEnd()
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
            await self._send({"type": "http.response.body", "body": self._shape.error_event(error), "more_body": False})
            return
        await self._send({"type": "http.response.body", "body": out, "more_body": more})

    async def _send_error(self, error: APIError) -> None:
        body = json.dumps(error.body()).encode()
        await self._send({"type": "http.response.start", "status": error.status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _with_additions(self, raw: bytes, per_choice: dict[int, dict[str, Any]] | None = None,
                        event: bool = False) -> bytes:
        """`raw` with the additions: a JSON body's top level, or where the API keeps them in a
        stream's event."""
        try:
            data = json.loads(raw)
        except ValueError:
            self._last_chunk = {}
            return raw
        self._last_chunk = data if isinstance(data, dict) else {}
        if isinstance(data, dict):
            target = self._shape.echo_target(data) if event else data
            if target is not None:
                target.update(self._additions)
            for choice in data.get("choices", []) if per_choice else ():
                choice.update(per_choice.get(choice.get("index"), {}))
            for choice in data.get("choices", []) if self._trace_pieces is not None else ():
                choice["trace"] = self._pending_traces.pop(choice.get("index"), [])
        return json.dumps(data).encode()

    async def _sse_event(self, event: bytes) -> bytes:
        # `data: {...}`, or a named event: `event: name\ndata: {...}`
        prefix = b"data: "
        start = 0 if event.startswith(prefix) else event.find(b"\n" + prefix) + 1
        if start == 0 and not event.startswith(prefix):
            return event
        head, start = event[:start], start + len(prefix)
        if event[start:].strip() != b"[DONE]":
            return head + prefix + await self._named_end(self._with_additions(event[start:], event=True))
        if self._final is None or not self._shape.ends_with_done:
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

    async def _named_end(self, data: bytes) -> bytes:
        """For an API whose stream ends with an event of its own (api_shapes.py): that event
        takes the end-of-response fields."""
        target = self._shape.end_target(self._last_chunk)
        if target is None:
            return data
        end, self._final = (await self._final() if self._final is not None else ResponseEnd()), None  # taken once
        if end.rejected is not None:
            raise end.rejected
        target.update({**self._additions, **end.fields})
        return json.dumps(self._last_chunk).encode()
