"""Checks every JSON request body passes before any handler sees it: size, nesting depth, the
plugin's reserved `vllm_xargs` keys, and which routes take `steering`.

Pure functions over bytes and parsed JSON, each raising the APIError a client gets; the
middleware (steering.py) decides when to call them.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from pydantic import TypeAdapter, ValidationError

from steerserve_sae.protocol.signing import RESERVED_PREFIX, SignatureError, verify

from steerserve.errors import APIError
from steerserve.limits import PriorityRange

# Routes whose requests the middleware translates (`steering` validated, applied, echoed).
# `/invocations` is SageMaker's alias that dispatches to chat or text completions by body;
# where the Responses and Messages APIs keep the echo: middleware/api_shapes.py.
STEERABLE_PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations", "/v1/responses", "/v1/messages")
# Steerserve's own routes that take `steering`: forwarded through a steerable route, or stored
# as a preset (validated like an inline field there).
FORWARDING_PREFIXES = ("/v1/features/", "/v1/steering/presets")


def declared_over(content_length: str | None, limit: int) -> bool:
    """Whether a Content-Length header alone says the body is over `limit` bytes (more than 19
    digits is over any limit, and int() refuses numbers of more than 4300 digits); a missing or
    malformed header says nothing, and the bytes are counted as they arrive instead."""
    return (content_length is not None and re.fullmatch(r"[0-9]+", content_length) is not None
            and (len(content_length) > 19 or int(content_length) > limit))


def too_large(limit: int) -> APIError:
    return APIError(f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def parse_json_body(body: bytes, max_depth: int) -> Any:
    """The parsed body, or a 400 that says why it is not acceptable JSON."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except UnicodeDecodeError:
        raise APIError("the request body is not UTF-8 text", code="invalid_json") from None
    except ValueError as exc:
        raise APIError(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if _depth(payload) > max_depth:
        raise _too_deep(max_depth)
    return payload


def _too_deep(max_depth: int) -> APIError:
    return APIError(f"the request body nests objects and arrays deeper than {max_depth} levels",
                    code="json_too_deep")


def _depth(value: Any) -> int:
    """Nesting depth of objects and arrays, without recursion (the input is hostile)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_vllm_xargs(payload: dict) -> None:
    """`vllm_xargs` keys starting with `steerserve_` carry specs the workers act on: only this
    server may set them (signed, see sae_plugins/steerserve_sae/protocol/signing.py), never a client."""
    xargs = payload.get("vllm_xargs")
    if xargs is None:
        return
    if not isinstance(xargs, dict):
        raise APIError("vllm_xargs must be an object", param="vllm_xargs", code="invalid_type")
    for key, value in xargs.items():
        if key.startswith(RESERVED_PREFIX):
            try:
                verify(value)
            except SignatureError:
                raise APIError(f"vllm_xargs.{key} is reserved for steerserve; use the `steering` field",
                               param=f"vllm_xargs.{key}", code="reserved_field") from None


_LAX_INT = TypeAdapter(int)


def as_vllm_reads_int(value: object) -> int | None:
    """An integer field (`priority`, `n`, `max_tokens`) as vLLM's request models read it, in
    pydantic's lax mode ("5", 5.0 and True are integers there); None where vLLM would refuse it."""
    try:
        return _LAX_INT.validate_python(value)
    except ValidationError:
        return None


def check_priority(payload: dict, allowed: PriorityRange) -> None:
    """A `priority` outside --client-priority-range is refused: vLLM serves lower numbers first,
    so any client could otherwise jump the queue. Read as vLLM reads it ("-5" and -5.0 are -5);
    what vLLM cannot read as an integer is left to its own 400."""
    priority = as_vllm_reads_int(payload.get("priority"))
    if priority is not None and not allowed.allows(priority):
        raise APIError(f"priority {priority} is not allowed: requests to this server may carry a priority "
                       f"{allowed.describe()} (--client-priority-range {allowed}; lower numbers are served first)",
                       param="priority", code="priority_out_of_range")


def check_cache_salt(payload: dict) -> None:
    salt = payload.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError("cache_salt must be a non-empty string", param="cache_salt", code="invalid_type")


def is_steerable(path: str) -> bool:
    return path.endswith(STEERABLE_PATHS)


def check_route_takes_steering(path: str, payload: dict) -> None:
    """A `steering` (or `trace`) field must never be silently ignored: routes that cannot apply
    it refuse it."""
    if path.startswith(FORWARDING_PREFIXES):
        return
    for name in ("steering", "trace"):
        if payload.get(name) is not None:
            routes = "/v1/chat/completions, /v1/completions, /v1/responses or /v1/messages" if name == "steering" \
                else "/v1/chat/completions or /v1/completions"
            raise APIError(f"{name} is not supported on {path}; use {routes}",
                           param=name, code="steering_unsupported_route")
