"""OpenAI Files API (`/v1/files`): uploads for batches, and the batches' output files.

Contents live where contents.py keeps them (DATA_DIR/files/<id>, or the fleet's PostgreSQL with
--database-url), metadata in the database (store.py). Errors use the same
OpenAI error object as the rest of the server (server/steerserve/errors.py).

An upload over `max_upload_bytes` is refused from its Content-Length before the body is read,
or, without one, as soon as the bytes received pass the limit: the multipart parser stops there
and deletes what it spooled, so neither memory nor disk ever holds more than the limit. The form
is read so by FilesRoute before FastAPI validates its `file` and `purpose`.
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from starlette.datastructures import FormData
from starlette.types import Message

from steerserve.batch.api_models import (
    MAX_FILE_LIST_LIMIT, FileDeleted, FileList, FileListQuery, FileObject, UploadPurpose, UPLOAD_PURPOSES,
)
from steerserve.batch.records import FileInUse, FileRecord, new_file_id, now
from steerserve.errors import APIError
from steerserve.middleware.guard import declared_over
from steerserve.routers.route import SteerserveRoute

# Non-file form fields (`purpose`) are held in memory: few and small.
FORM_FIELDS = 16
FORM_FIELD_BYTES = 64 << 10


def service_of(request: Request):
    service = getattr(request.app.state, "steerserve_batches", None)
    if service is None:
        raise APIError("the Files and Batches API is not available on this server", code="unavailable",
                       status=HTTPStatus.SERVICE_UNAVAILABLE, type="server_error")
    return service


def not_found(kind: str, object_id: str, param: str = "id") -> APIError:
    return APIError(f"No such {kind} object: {object_id}", param=param, code="not_found",
                    status=HTTPStatus.NOT_FOUND)


async def stored_or_404(kind: str, get, object_id: str, param: str = "id"):
    """`get(object_id)` from the store (off the event loop), or the 404 for that object."""
    record = await asyncio.to_thread(get, object_id)
    if record is None:
        raise not_found(kind, object_id, param=param)
    return record


def list_page(records: list, has_more: bool) -> dict:
    """OpenAI's cursor-paginated list object."""
    data = [r.to_api() for r in records]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def parse_limit(raw: str | None, default: int, maximum: int) -> int:
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise APIError(f"limit must be an integer, got {raw!r}", param="limit", code="invalid_limit") from None
    if not 1 <= limit <= maximum:
        raise APIError(f"limit must be between 1 and {maximum}, got {limit}", param="limit", code="invalid_limit")
    return limit


class _UploadTooLarge(Exception):
    """Raised from the body stream, so that the multipart parser stops and deletes its spool."""


def _too_large(limit: int) -> APIError:
    return APIError(f"the upload is larger than this server's limit of {limit} bytes", param="file",
                    code="file_too_large", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def _bounded(request: Request, limit: int) -> Request:
    """The same request, but its body stream fails once more than `limit` bytes have arrived."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _UploadTooLarge
        return message

    return Request(request.scope, receive)


async def _read_form(request: Request, limit: int) -> FormData:
    if declared_over(request.headers.get("content-length"), limit):
        raise _too_large(limit)
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):  # checked first: a form body would be read into memory
        raise APIError(f"expected a multipart/form-data body with `file` and `purpose`, got {content_type!r}",
                       code="invalid_body")
    try:
        return await _bounded(request, limit).form(max_files=1, max_fields=FORM_FIELDS,
                                                   max_part_size=FORM_FIELD_BYTES)
    except _UploadTooLarge:  # the parser has closed (deleted) its spooled files
        raise _too_large(limit) from None
    except Exception as exc:
        raise APIError(f"expected a multipart/form-data body with `file` and `purpose` "
                       f"({getattr(exc, 'detail', exc)})", code="invalid_body") from None


class FilesRoute(SteerserveRoute):
    """Reads an upload within --max-upload-bytes, and says what is wrong with its fields."""

    async def read_form(self, request: Request) -> FormData:
        return await _read_form(request, service_of(request).limits.max_upload_bytes)

    def problem(self, error: dict[str, Any]) -> APIError:
        field = error["loc"][0] if error["loc"] else None
        if field == "file":  # missing, or sent as a text field
            return APIError("`file` is required (a multipart file field)", param="file",
                            code="missing_required_parameter")
        if field == "purpose" and error["type"] == "missing":  # an empty field counts as missing
            return APIError("`purpose` is required", param="purpose", code="missing_required_parameter")
        if field == "purpose":
            return APIError(f"purpose {error['input']!r} is not one of {list(UPLOAD_PURPOSES)}", param="purpose",
                            code="invalid_purpose")
        return super().problem(error)


router = APIRouter(route_class=FilesRoute)


@router.post("/v1/files", response_model=FileObject)
async def create_file(
    request: Request,
    file: Annotated[UploadFile, File(description="the file's bytes: for a batch, JSONL request lines")],
    purpose: Annotated[UploadPurpose, Form()],
) -> dict[str, Any]:
    store = service_of(request).store
    file_id = new_file_id()
    size = await asyncio.to_thread(store.contents.save, file_id, file.file)
    record = FileRecord(file_id, os.path.basename(file.filename or "upload.jsonl"), purpose, size, now())
    await asyncio.to_thread(store.add_file, record)
    return record.to_api()


@router.get("/v1/files", response_model=FileList)
async def list_files(request: Request, query: Annotated[FileListQuery, Query()]) -> dict[str, Any]:
    store = service_of(request).store
    order = "desc" if query.order is None else query.order
    if order not in ("asc", "desc"):
        raise APIError(f"order must be 'asc' or 'desc', got {order!r}", param="order", code="invalid_order")
    limit = parse_limit(query.limit, MAX_FILE_LIST_LIMIT, MAX_FILE_LIST_LIMIT)
    page = await asyncio.to_thread(store.list_files, purpose=query.purpose, after=query.after,
                                   limit=limit, newest_first=order == "desc")
    if page is None:
        raise not_found("File", query.after, param="after")
    return list_page(*page)


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return (await stored_or_404("File", service_of(request).store.get_file, file_id)).to_api()


@router.get("/v1/files/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}},
                             "description": "the file's bytes"}})
async def file_content(file_id: str, request: Request) -> StreamingResponse:
    store = service_of(request).store
    record = await asyncio.to_thread(store.get_file, file_id)
    if record is None or not await asyncio.to_thread(store.contents.exists, file_id):
        raise not_found("File", file_id)
    path = store.contents.local_path(file_id)
    if path is not None:
        return FileResponse(path, media_type="application/octet-stream", filename=record.filename)
    # From the database, a chunk at a time (each read off the event loop).
    chunks = store.contents.chunks(file_id)

    async def body():
        while (block := await asyncio.to_thread(next, chunks, None)) is not None:
            yield block

    headers = {"content-disposition": f"attachment; filename*=utf-8''{quote(record.filename)}",
               "content-length": str(record.bytes)}
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    try:
        deleted = await asyncio.to_thread(service_of(request).store.delete_file, file_id)
    except FileInUse as busy:
        raise APIError(f"file {file_id} is the input of batch {busy.batch_id}, which is {busy.status}; "
                       "delete it once the batch has finished or been cancelled", param="file_id",
                       code="file_in_use", status=HTTPStatus.CONFLICT) from None
    if not deleted:
        raise not_found("File", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
