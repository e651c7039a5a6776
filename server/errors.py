"""OpenAI-shaped errors: every rejection the server makes goes through here."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from fastapi.responses import JSONResponse


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
