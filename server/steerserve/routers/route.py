"""The route class of steerserve's own routes: bodies read by the server's rules, and what a
request model refuses answered as an OpenAI error.

FastAPI validates each route's request models (body, query, path) and publishes them in
/openapi.json. Two things it would do its own way are done here instead:
- the body is read before FastAPI sees it: JSON as strict UTF-8 text (an empty, malformed,
  non-UTF-8 or too deeply nested body is `invalid_json`), a multipart form by the route's own
  bounded reader (`read_form`, batch/files_api.py), so FastAPI's generic "error parsing the body"
  never answers and no upload is read past its limit;
- a RequestValidationError becomes an APIError (answered by the app's handler, errors.py) whose
  `param` is the JSON path of the value. vLLM registers its own RequestValidationError handler
  after the plugins attach, and its routes rely on that one, so the conversion is per route here,
  not an app-wide handler.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.requests import Request
from pydantic import Field, WithJsonSchema
from starlette.responses import Response

from steerserve.errors import APIError, OpenAIError, first_problem

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
# Every route answers its errors in OpenAI's shape, as a 400 where FastAPI would send a 422.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": OpenAIError, "description": "the request was refused: the error says which field and why"},
    "5XX": {"model": OpenAIError, "description": "the server could not answer"},
}


class ReadRequest(Request):
    """The request with its body already read: FastAPI takes the body from here."""

    def __init__(self, request: Request, body: bytes = b"", payload: Any = None, form: FormData | None = None):
        super().__init__(request.scope, request.receive)
        self._read_body, self._payload, self._read_form = body, payload, form

    async def body(self) -> bytes:
        return self._read_body

    async def json(self) -> Any:
        return self._payload

    async def form(self, **_: Any) -> FormData:  # type: ignore[override]  # FastAPI awaits it
        assert self._read_form is not None
        return self._read_form


def parse_json(body: bytes) -> Any:
    """The body as JSON (UTF-8 text, as RFC 8259 has it), or the 400 that says why not."""
    if not body.strip():
        raise APIError("the request body is empty; this route takes a JSON object", code="invalid_json")
    try:
        return json.loads(body.decode("utf-8"))
    except RecursionError:
        raise APIError("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise APIError(f"the request body is not valid UTF-8 JSON ({exc})", code="invalid_json") from None


def integer_query(minimum: int | None = None, maximum: int | None = None, default: int | None = None) -> Any:
    """A query parameter the schema shows as an integer in [minimum, maximum], kept as its text:
    the handler reads it, so the 400 says what was sent and what is allowed."""
    bounds = {k: v for k, v in {"minimum": minimum, "maximum": maximum}.items() if v is not None}
    return Annotated[str | None, WithJsonSchema({"type": "integer", **bounds}),
                     Field(description=None if default is None else f"default: {default}")]


def declares_json(request: Request) -> bool:
    """Whether FastAPI reads this body as JSON (no Content-Type counts: the routes are lenient)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type in ("", "application/json") or (media_type.startswith("application/")
                                                      and media_type.endswith("+json"))


class SteerserveRoute(APIRoute):
    """A route whose request models FastAPI validates, answering as the rest of the server does."""

    validation_code = "invalid_request"  # the code of a request its model refuses
    missing_code: str | None = None  # the code when a required field is missing, where it differs

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("strict_content_type", False)  # a body without Content-Type is read as JSON
        kwargs["responses"] = {**ERROR_RESPONSES, **(kwargs.get("responses") or {})}
        super().__init__(*args, **kwargs)

    def problem(self, error: dict[str, Any]) -> APIError:
        """The APIError for the first thing the request's models refused; `error` is pydantic's,
        its `loc` without FastAPI's leading "body", "query" or "path"."""
        return first_problem([error], prefix="invalid request", code=self.validation_code,
                             missing_code=self.missing_code)

    async def read_form(self, request: Request) -> FormData:
        """A route with a form body reads it within its own limits."""
        raise NotImplementedError(f"{self.path} takes a form but bounds no upload")

    async def _read(self, request: Request) -> Request:
        if self.body_field is None:
            return request
        if isinstance(self.body_field.field_info, params.Form):
            return ReadRequest(request, form=await self.read_form(request))
        body = await request.body()
        if not declares_json(request):
            raise APIError(f"{self.path} takes a JSON body: send `Content-Type: application/json`",
                           code="unsupported_media_type", status=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        return ReadRequest(request, body, payload=parse_json(body))

    def get_route_handler(self) -> Handler:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handle(await self._read(request))
            except RequestValidationError as exc:
                first = dict(exc.errors()[0])
                first["loc"] = tuple(first["loc"])[1:]
                raise self.problem(first) from None

        return route
