"""OpenAI-shaped errors: every rejection the server makes goes through here.

One error type (APIError), one way to turn a pydantic failure into it (`from_validation`),
and one route decorator that answers an APIError raised inside a handler (`errors_as_json`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError


@dataclass
class APIError(Exception):
    message: str
    param: str | None = None
    code: str = "invalid_request"
    status: int = HTTPStatus.BAD_REQUEST
    type: str = "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def json_path(loc: tuple, root: str = "") -> str:
    """A pydantic error location as a JSON path: ("features", 2, "index") -> features[2].index."""
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def from_validation(exc: ValidationError, *, prefix: str, code: str, root: str = "",
                    missing_code: str | None = None) -> APIError:
    """The first problem pydantic found, as a 400 whose `param` is the JSON path of the value."""
    first = exc.errors()[0]
    message = f"unknown key {first['loc'][-1]!r}" if first["type"] == "extra_forbidden" else first["msg"]
    if first["type"] == "missing" and missing_code is not None:
        code = missing_code
    return APIError(f"{prefix}: {message}", param=json_path(first["loc"], root) or None, code=code)


def errors_as_json(handler):
    """Route decorator: an APIError raised by the handler becomes its JSON response (vLLM's
    exception handlers would reshape it)."""

    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except APIError as error:
            return error.response()

    return wrapped
