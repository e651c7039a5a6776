"""ASGI middleware that adds `steering` to vLLM's own completion endpoints.

It sits in front of vLLM's OpenAI app, so everything vLLM serves (streaming, n, stop, seed,
logprobs, tools, response formats) keeps working: the request body is validated and translated
(request_translation.py), and the response, JSON or server-sent events, gets the normalised
spec echoed back. Unsteered requests pass through untouched apart from a JSON parse.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .request_translation import translate_request

STEERABLE_PATHS = ("/v1/chat/completions", "/v1/completions")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


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
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(STEERABLE_PATHS):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # let vLLM report malformed requests its own way
            await self.app(scope, _replay(body, receive), send)
            return
        context = scope["app"].state.steerserve
        had_steering_key = "steering" in payload
        try:
            translation = translate_request(payload, context.sae_sizes, context.max_features)
        except APIError as error:
            context.metrics.validation_error(error.code)
            await error.response()(scope, _replay(b"", receive), send)
            return
        spec = translation.spec
        if spec is None:  # untouched unless a `"steering": null` had to be dropped
            forwarded = json.dumps(translation.body).encode() if had_steering_key else body
            await self.app(_with_length(scope, forwarded), _replay(forwarded, receive), send)
            return
        additions: dict[str, Any] = {"steering": spec.echo()}
        if translation.baseline_body is not None:
            baseline = json.dumps(translation.baseline_body).encode()
            start, content = await self._collect(_with_length(scope, baseline), _replay(baseline, receive))
            if start["status"] != 200:  # the unsteered twin failed: that answer stands
                await send(start)
                await send({"type": "http.response.body", "body": content, "more_body": False})
                return
            additions["baseline"] = json.loads(content)
        new_body = json.dumps(translation.body).encode()
        context.metrics.steered_request()
        try:
            async with context.admission.admit(spec.id):
                await self.app(_with_length(scope, new_body), _replay(new_body, receive), _EchoingSend(send, additions))
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


class _EchoingSend:
    """Adds `additions` (the `steering` echo, and `baseline` for compare) to a JSON body or to
    every `data:` event of a stream."""

    def __init__(self, send: Send, additions: dict[str, Any]):
        self._send = send
        self._additions = additions
        self._start: Message | None = None
        self._mode = "passthrough"
        self._buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            content_type = headers.get(b"content-type", b"").decode()
            if message["status"] == 200 and content_type.startswith("application/json"):
                self._mode, self._start = "json", message  # sent once the body is rewritten
                return
            if message["status"] == 200 and content_type.startswith("text/event-stream"):
                self._mode = "sse"
            await self._send(message)
            return
        if message["type"] != "http.response.body" or self._mode == "passthrough":
            await self._send(message)
            return
        self._buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self._mode == "json":
            if more:
                return
            body = self._with_additions(self._buffer)
            assert self._start is not None
            headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self._send({**self._start, "headers": headers})
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        events, _, rest = self._buffer.rpartition(b"\n\n")
        self._buffer = rest
        out = b"".join(self._sse_event(e) + b"\n\n" for e in events.split(b"\n\n")) if events else b""
        if not more and rest:
            out += self._sse_event(rest)
            self._buffer = b""
        await self._send({"type": "http.response.body", "body": out, "more_body": more})

    def _with_additions(self, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict):
            data.update(self._additions)
        return json.dumps(data).encode()

    def _sse_event(self, event: bytes) -> bytes:
        prefix = b"data: "
        if event.startswith(prefix) and event[len(prefix):].strip() != b"[DONE]":
            return prefix + self._with_additions(event[len(prefix):])
        return event
