"""API-key authentication on every route, not only vLLM's `/v1` ones.

vLLM's own `--api-key` check guards only paths under /v1, /v2, /inference and /cohere, which
leaves `/invocations` (chat and completions), `/tokenize`, `/metrics`, `/openapi.json` and
others open. `steerserve serve` therefore takes the keys away from vLLM (cli.py) and this
middleware checks them on every path except the few named open (`--unauthenticated-paths`,
default /health and /ping, so load balancers can probe), answering 401 in the OpenAI error
shape. Every method needs the key, OPTIONS and HEAD included (an OPTIONS on `/metrics` would
otherwise reach its Prometheus app). CORS preflights never get here: vLLM's CORS middleware,
outside this one, answers them itself, from `--allowed-origins` (an empty list, the default,
refuses every cross-origin preflight). A client still writing its body reads the 401 before the
connection closes (body_reading.refuse).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from argparse import Namespace
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from steerserve.middleware.body_reading import BodyChannel, refuse
from steerserve.errors import APIError
from steerserve.limits import Limits

DEFAULT_OPEN_PATHS = ("/health", "/ping")
KEYS_ATTRIBUTE = "steerserve_api_keys"  # where cli.py leaves the keys on vLLM's args


def api_keys(args: Namespace) -> list[str]:
    """The keys this server requires: moved aside by `steerserve serve`, else vLLM's own."""
    keys = getattr(args, KEYS_ATTRIBUTE, None)
    if keys is None:
        keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
    return [k for k in keys if k]


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], open_paths: tuple[str, ...] = DEFAULT_OPEN_PATHS):
        self.app = app
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self._open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (not self._digests or scope["type"] not in ("http", "websocket")
                or scope["path"].removeprefix(scope.get("root_path", "")) in self._open_paths
                or self._authorized(Headers(scope=scope))):
            await self.app(scope, receive, send)
            return
        error = APIError("a valid API key is required: send `Authorization: Bearer <key>`",
                         code="invalid_api_key", status=HTTPStatus.UNAUTHORIZED, type="authentication_error")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        # A client writing a body it sent without a key reads the 401 like the guard's 413 (body_reading.py).
        context = getattr(scope["app"].state, "steerserve", None) if "app" in scope else None
        limits = context.limits if context is not None else Limits()
        await refuse(error, scope, BodyChannel(receive), send, limits.max_request_bytes)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any(hmac.compare_digest(digest, d) for d in self._digests)
