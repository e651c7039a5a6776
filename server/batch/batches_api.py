"""OpenAI Batches API (`/v1/batches`). Creating and cancelling only write the database and wake
the runner (runner.py), which does the work; so every state change survives a restart."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steerserve.errors import APIError, errors_as_json, from_validation
from steerserve.batch.files_api import list_page, not_found, parse_limit, service_of, stored_or_404
from steerserve.batch.lines import SUPPORTED_ENDPOINTS
from steerserve.batch.store import BatchRecord, Store, now

router = APIRouter()

MAX_WINDOW_HOURS = 168
CANCELLABLE = ("validating", "in_progress")


class CreateBatch(BaseModel):
    """The body of POST /v1/batches (unknown keys are ignored, as new OpenAI clients may send more)."""

    model_config = ConfigDict(extra="ignore")
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("at most 16 metadata pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
                raise ValueError("metadata keys have at most 64 characters and values at most 512")
        return value


def window_seconds(window: str) -> int:
    """OpenAI accepts "24h"; any whole number of hours from 1 to a week is accepted here."""
    match = re.fullmatch(r"([0-9]{1,4})h", window)  # no int() of a 5000-digit number
    if not match or not 1 <= int(match.group(1)) <= MAX_WINDOW_HOURS:
        raise APIError(
            f"completion_window must be a number of hours like '24h' (1h to {MAX_WINDOW_HOURS}h), got {window!r}",
            param="completion_window", code="invalid_completion_window",
        )
    return int(match.group(1)) * 3600


async def _parse_create(request: Request) -> CreateBatch:
    try:
        raw = json.loads((await request.body()).decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise APIError(f"the request body is not valid UTF-8 JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply", code="invalid_json") from None
    try:
        return CreateBatch.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, prefix="invalid request", code="invalid_value",
                              missing_code="missing_required_parameter") from None


@router.post("/v1/batches")
@errors_as_json
async def create_batch(request: Request) -> Any:
    service = service_of(request)
    store: Store = service.store
    body = await _parse_create(request)
    if body.endpoint not in SUPPORTED_ENDPOINTS:
        raise APIError(f"endpoint {body.endpoint!r} is not supported; supported: {list(SUPPORTED_ENDPOINTS)}",
                       param="endpoint", code="invalid_endpoint")
    window = window_seconds(body.completion_window)
    file = await stored_or_404("File", store.get_file, body.input_file_id, param="input_file_id")
    if file.purpose != "batch":
        raise APIError(f"file {file.id} has purpose {file.purpose!r}; a batch's input file needs purpose 'batch'",
                       param="input_file_id", code="invalid_file_purpose")
    created = now()
    batch = BatchRecord(
        id=f"batch_{uuid.uuid4().hex[:24]}", input_file_id=file.id, endpoint=body.endpoint,
        completion_window=body.completion_window, status="validating", created_at=created,
        expires_at=created + window, metadata=body.metadata,
    )
    if not await asyncio.to_thread(store.add_batch, batch):  # the file was deleted meanwhile
        raise not_found("File", file.id, param="input_file_id")
    service.wake()
    stored = await asyncio.to_thread(store.get_batch, batch.id)
    return stored.to_api()


@router.get("/v1/batches")
@errors_as_json
async def list_batches(request: Request) -> Any:
    store: Store = service_of(request).store
    limit = parse_limit(request.query_params.get("limit"), 20, 100)
    after = request.query_params.get("after")
    page = await asyncio.to_thread(store.list_batches, after=after, limit=limit)
    if page is None:
        raise not_found("Batch", after, param="after")
    return list_page(*page)


@router.get("/v1/batches/{batch_id}")
@errors_as_json
async def retrieve_batch(batch_id: str, request: Request) -> Any:
    return (await stored_or_404("Batch", service_of(request).store.get_batch, batch_id)).to_api()


@router.post("/v1/batches/{batch_id}/cancel")
@errors_as_json
async def cancel_batch(batch_id: str, request: Request) -> Any:
    service = service_of(request)
    store: Store = service.store
    if await asyncio.to_thread(store.transition, batch_id, CANCELLABLE, "cancelling", cancelling_at=now()):
        service.wake()
    batch = await stored_or_404("Batch", store.get_batch, batch_id)
    if batch.status not in ("cancelling", "cancelled"):
        raise APIError(f"cannot cancel batch {batch_id}: its status is {batch.status!r}", param="id",
                       code="invalid_state", status=HTTPStatus.CONFLICT)
    return batch.to_api()
