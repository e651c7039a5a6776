"""Reading a request body once, the way vLLM will read it, and refusing what is ambiguous.

The guard (middleware/steering.py) and the handler behind it must read the same bytes with the
same rules, or a client can show each a different request. Starlette's `Headers` (which vLLM's
handlers use) returns the first of repeated headers and a dict of the raw headers the last, so a
request with several `Content-Type` headers is refused outright. Every route but the multipart
upload routes (FORM_PATHS) reads its body as JSON (vLLM's own JSON routes refuse any media type
but `application/json`, steerserve's also read an undeclared one, routers/route.py), so there a
non-empty body must be declared `application/json`: the guard then parses exactly what the
handler will, with its size and depth limits.

A refusal sent before the body is read must not close the connection on a client still writing
it (a client that writes the whole body before reading, like Python's urllib, would get a
connection reset instead of the answer): `refuse` sends the answer, then reads and drops up to
DRAIN_FACTOR times the size limit for at most DRAIN_SECONDS before it completes the response.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus

from starlette.types import Message, Receive, Scope, Send

from steerserve.errors import APIError
from steerserve.middleware.guard import declared_over, too_large

# Routes whose bodies are multipart forms, each bounded by its own handler: the Files API's
# uploads (files_api.py) and vLLM's audio routes (served only for speech-to-text models).
FORM_PATHS = frozenset({"/v1/files", "/v1/audio/transcriptions", "/v1/audio/translations"})
# Routes that take JSON or, sent as multipart/form-data, an upload their handler bounds
# (stored vectors, routers/vectors.py).
JSON_OR_FORM_PATHS = frozenset({"/v1/steering/vectors"})
BODY_METHODS = ("POST", "PUT", "PATCH")
DRAIN_FACTOR = 4  # a refused body is read (and dropped) up to this many times the limit
DRAIN_SECONDS = 10.0  # and for at most this long


class BodyChannel:
    """The request's receive channel, counting what has arrived, so a refusal knows whether
    the client is still sending."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self.received = 0
        self.complete = False  # the last body message (or a disconnect) has arrived

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self.complete = True
        return message


def header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key.lower() == name]


def reads_json(scope: Scope) -> bool:
    """Whether the guard reads this request's body: any body sent to a route that is not a
    multipart upload route, nor an upload to a route that also takes one."""
    if scope["path"] in JSON_OR_FORM_PATHS and _media_type(scope) == "multipart/form-data":
        return False
    return scope["type"] == "http" and scope["method"] in BODY_METHODS and scope["path"] not in FORM_PATHS


def check_headers(scope: Scope) -> None:
    """A 400 for a request whose readers could disagree on its content type."""
    content_types = header_values(scope, b"content-type")
    if len(content_types) > 1:
        raise APIError(f"the request has {len(content_types)} Content-Type headers; send exactly one",
                       code="ambiguous_content_type")


def _content_length(scope: Scope) -> str | None:
    values = header_values(scope, b"content-length")  # the HTTP parser refuses several
    return values[0].decode("latin-1") if values else None


def _media_type(scope: Scope) -> str:
    values = header_values(scope, b"content-type")
    return values[0].decode("latin-1").split(";", 1)[0].strip().lower() if values else ""


async def read_json_body(scope: Scope, receive: BodyChannel, limit: int) -> bytes:
    """The whole body of a JSON route, or the 4xx that says why it is not read: over `limit`
    bytes (413, declared or as it arrives), or a non-empty body not declared as JSON (415)."""
    if declared_over(_content_length(scope), limit):
        raise too_large(limit)
    chunks: list[bytes] = []
    while not receive.complete:
        message = await receive()
        chunks.append(message.get("body", b""))
        if receive.received > limit:
            raise too_large(limit)
    body = b"".join(chunks)
    media_type = _media_type(scope)
    if body.strip() and media_type != "application/json":
        raise APIError(f"{scope['path']} takes a JSON body: send `Content-Type: application/json` (got "
                       f"{media_type or 'no Content-Type'!r})", code="unsupported_media_type",
                       status=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    return body


async def refuse(error: APIError, scope: Scope, receive: BodyChannel, send: Send, limit: int) -> None:
    """Sends `error`; while the client may still be writing its body, reads and drops up to
    DRAIN_FACTOR x `limit` bytes of it (at most DRAIN_SECONDS) before completing the response,
    so the connection is not closed under a client that reads only once it has written all."""
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    if _worth_draining(scope, receive, limit):
        await _drain(receive, DRAIN_FACTOR * limit, time.monotonic() + DRAIN_SECONDS)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _worth_draining(scope: Scope, receive: BodyChannel, limit: int) -> bool:
    """Not when the body is in, when the client waits for `100 Continue` before sending it (it
    now has its answer instead), or when it declared more than would be drained anyway."""
    if receive.complete or any(v.lower() == b"100-continue" for v in header_values(scope, b"expect")):
        return False
    return not declared_over(_content_length(scope), DRAIN_FACTOR * limit)


async def _drain(receive: BodyChannel, most: int, deadline: float) -> None:
    while not receive.complete and receive.received <= most:
        try:
            await asyncio.wait_for(receive(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            return
