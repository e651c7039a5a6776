"""OpenAI Batches API (`/v1/batches`). Creating and cancelling only write the database and wake
the runner (runner.py), which does the work; so every state change survives a restart."""

from __future__ import annotations

import asyncio
import re
import uuid
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from steerserve.batch.api_models import (
    BATCH_LIST_LIMIT, MAX_BATCH_LIST_LIMIT, BatchList, BatchListQuery, BatchObject, CreateBatch,
)
from steerserve.batch.files_api import list_page, not_found, parse_limit, service_of, stored_or_404
from steerserve.batch.lines import SUPPORTED_ENDPOINTS
from steerserve.batch.records import BatchRecord, now
from steerserve.errors import APIError
from steerserve.routers.route import SteerserveRoute

MAX_WINDOW_HOURS = 168
CANCELLABLE = ("validating", "in_progress")


class BatchesRoute(SteerserveRoute):
    validation_code = "invalid_value"
    missing_code = "missing_required_parameter"


router = APIRouter(route_class=BatchesRoute)


def window_seconds(window: str) -> int:
    """OpenAI accepts "24h"; any whole number of hours from 1 to a week is accepted here."""
    match = re.fullmatch(r"([0-9]{1,4})h", window)  # no int() of a 5000-digit number
    if not match or not 1 <= int(match.group(1)) <= MAX_WINDOW_HOURS:
        raise APIError(
            f"completion_window must be a number of hours like '24h' (1h to {MAX_WINDOW_HOURS}h), got {window!r}",
            param="completion_window", code="invalid_completion_window",
        )
    return int(match.group(1)) * 3600


@router.post("/v1/batches", response_model=BatchObject)
async def create_batch(request: Request, body: CreateBatch) -> dict[str, Any]:
    service = service_of(request)
    store = service.store
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
        expires_at=created + window, metadata=body.metadata, server_id=service.identity.key,
    )
    if not await asyncio.to_thread(store.add_batch, batch):  # the file was deleted meanwhile
        raise not_found("File", file.id, param="input_file_id")
    service.wake()
    stored = await asyncio.to_thread(store.get_batch, batch.id)
    return stored.to_api()


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(request: Request, query: Annotated[BatchListQuery, Query()]) -> dict[str, Any]:
    store = service_of(request).store
    limit = parse_limit(query.limit, BATCH_LIST_LIMIT, MAX_BATCH_LIST_LIMIT)
    page = await asyncio.to_thread(store.list_batches, after=query.after, limit=limit)
    if page is None:
        raise not_found("Batch", query.after, param="after")
    return list_page(*page)


@router.get("/v1/batches/{batch_id}", response_model=BatchObject)
async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return (await stored_or_404("Batch", service_of(request).store.get_batch, batch_id)).to_api()


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    service = service_of(request)
    store = service.store
    if await asyncio.to_thread(store.transition, batch_id, CANCELLABLE, "cancelling", cancelling_at=now()):
        service.wake()
    batch = await stored_or_404("Batch", store.get_batch, batch_id)
    if batch.status not in ("cancelling", "cancelled"):
        raise APIError(f"cannot cancel batch {batch_id}: its status is {batch.status!r}", param="id",
                       code="invalid_state", status=HTTPStatus.CONFLICT)
    return batch.to_api()
