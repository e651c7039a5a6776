"""OpenAI-shaped errors: every rejection the server makes goes through here.

One error type (APIError), one way to turn pydantic's findings into it (`first_problem`), and one
exception handler that answers an APIError raised inside a route (`answer_api_errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


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


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The body of every error response, as /openapi.json describes it."""

    error: OpenAIErrorInfo


def json_path(loc: Sequence, root: str = "") -> str:
    """A pydantic error location as a JSON path: ("features", 2, "index") -> features[2].index."""
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def first_problem(errors: Sequence[dict[str, Any]], *, prefix: str, code: str, root: str = "",
                  missing_code: str | None = None) -> APIError:
    """The first problem pydantic found, as a 400 whose `param` is the JSON path of the value."""
    first = errors[0]
    message = f"unknown key {first['loc'][-1]!r}" if first["type"] == "extra_forbidden" else first["msg"]
    if first["type"] == "missing" and missing_code is not None:
        code = missing_code
    return APIError(f"{prefix}: {message}", param=json_path(first["loc"], root) or None, code=code)


def from_validation(exc: ValidationError, *, prefix: str, code: str, root: str = "",
                    missing_code: str | None = None) -> APIError:
    return first_problem(exc.errors(), prefix=prefix, code=code, root=root, missing_code=missing_code)


async def _answer(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


def answer_api_errors(app: FastAPI) -> None:
    """Registers the handler that answers an APIError raised by a route with its JSON body
    (vLLM's handler for plain exceptions would make it a 500)."""
    app.add_exception_handler(APIError, _answer)

