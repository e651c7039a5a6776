"""Stored direction vectors over HTTP: `POST/GET /v1/steering/vectors`, `GET/DELETE .../{name}`.

`POST` takes a JSON body (`name`, base64 `vector`, optional `layer` and `description`) or a
multipart upload (`file` plus the same text fields, and `tensor` to pick one tensor of a file that
holds several). An upload is read within --max-vector-upload-bytes (files_api's bounded reader)
and parsed off the event loop (steering/vector_files.py).
"""

from __future__ import annotations

import asyncio
import re
from http import HTTPStatus
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from steerserve_sae.protocol.spec import decode_vector

from steerserve.batch.files_api import FORM_FIELD_BYTES, FORM_FIELDS, _bounded, _too_large, _UploadTooLarge
from steerserve.errors import APIError, from_validation
from steerserve.middleware.guard import declared_over
from steerserve.routers.route import SteerserveRoute, declares_json, parse_json
from steerserve.steering.vector_files import read_vector_file
from steerserve.steering.vector_store import VectorStore, check_name, new_vector

router = APIRouter(route_class=SteerserveRoute)
LAYER_FIELD = re.compile(r"-?[0-9]{1,9}")


class VectorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(description="1 to 64 characters of A-Z a-z 0-9 . _ : -")
    vector: StrictStr = Field(description="base64 of d_model little-endian float32 values")
    layer: StrictInt | None = Field(None, description="the only layer it steers (default: any layer it is named at)")
    description: StrictStr | None = Field(None, max_length=1000)


class VectorUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: bytes = Field(description=".safetensors, .pt or .npy vector, or a GGUF control vector (one per layer)")
    name: StrictStr
    layer: StrictInt | None = None
    tensor: StrictStr | None = Field(None, description="the tensor to take from a file that holds several")
    description: StrictStr | None = Field(None, max_length=1000)


class VectorLayer(BaseModel):
    layer: int | None
    norm: float
    vector: str | None = None


class StoredVectorObject(BaseModel):
    object: Literal["steering.vector"]
    name: str
    d_model: int
    layers: list[VectorLayer]
    description: str | None
    created_at: int
    source: str


class VectorList(BaseModel):
    object: Literal["list"]
    data: list[StoredVectorObject]


class VectorDeleted(BaseModel):
    object: Literal["steering.vector"]
    name: str
    deleted: bool


def _upload_schema() -> dict[str, Any]:
    schema = VectorUpload.model_json_schema()
    schema["properties"]["file"] = {"type": "string", "format": "binary", "description":
                                    schema["properties"]["file"].get("description")}
    return schema


CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VectorCreate.model_json_schema()},
    "multipart/form-data": {"schema": _upload_schema()}}}}


def _store(request: Request) -> VectorStore:
    store = getattr(request.app.state.steerserve, "vectors", None)
    if store is None:
        raise APIError("stored vectors are unavailable on this server", code="unavailable",
                       status=HTTPStatus.SERVICE_UNAVAILABLE, type="server_error")
    return store


def _layer(text: str) -> int:
    """A form's `layer`: ASCII digits with an optional leading minus (int() would also take "²",
    "1_0" and " 5", and raise on 5,000 digits)."""
    if LAYER_FIELD.fullmatch(text) is None:
        raise APIError("layer must be a layer number (ASCII digits)", param="layer", code="invalid_request")
    return int(text)


async def _form_fields(request: Request, limit: int) -> dict[str, Any]:
    if declared_over(request.headers.get("content-length"), limit):
        raise _too_large(limit)
    try:
        form = await _bounded(request, limit).form(max_files=1, max_fields=FORM_FIELDS, max_part_size=FORM_FIELD_BYTES)
    except _UploadTooLarge:
        raise _too_large(limit) from None
    except Exception as exc:
        raise APIError(f"not a readable multipart form ({getattr(exc, 'detail', exc)})", code="invalid_body") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields[key] = _layer(value) if key == "layer" else value
        else:
            fields[key] = await value.read()
            await value.close()
    if not isinstance(fields.get("file"), bytes):
        raise APIError("`file` is required (a multipart file field)", param="file", code="missing_required_parameter")
    return fields


@router.post("/v1/steering/vectors", response_model=StoredVectorObject, response_model_exclude_unset=True,
             openapi_extra=CREATE_BODY)
async def create_vector(request: Request) -> dict[str, Any]:
    store = _store(request)
    context = request.app.state.steerserve
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    if not multipart and not declares_json(request):
        raise APIError("/v1/steering/vectors takes a JSON body or a multipart/form-data upload",
                       code="unsupported_media_type", status=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    raw = await _form_fields(request, context.limits.max_vector_upload_bytes) if multipart \
        else parse_json(await request.body())
    try:
        body = (VectorUpload if multipart else VectorCreate).model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc, prefix="invalid request", code="invalid_request",
                              missing_code="missing_required_parameter") from None
    check_name(body.name)
    if isinstance(body, VectorUpload):
        layers = await asyncio.to_thread(read_vector_file, body.file, store.d_model, body.tensor)
        source = "gguf" if body.file.startswith(b"GGUF") else "file"
        if body.layer is not None:
            if set(layers) != {None}:
                raise APIError("a control vector names its own layers: `layer` does not apply", param="layer",
                               code="invalid_request")
            layers = {body.layer: layers[None]}
    else:
        try:
            values = decode_vector(body.vector)
        except ValueError as exc:
            raise APIError(f"vector must be base64 of little-endian float32 values: {exc}", param="vector",
                           code="invalid_vector") from None
        layers, source = {body.layer: values}, "base64"
    vector = new_vector(body.name, layers, body.description, source, store.d_model)
    await asyncio.to_thread(store.put, vector)
    return vector.public()


@router.get("/v1/steering/vectors", response_model=VectorList, response_model_exclude_unset=True)
async def list_vectors(request: Request) -> dict[str, Any]:
    store = _store(request)  # every row is read (up to --max-stored-vectors of d_model floats): off the loop
    return {"object": "list", "data": await asyncio.to_thread(lambda: [v.public() for v in store.all()])}


def _not_found(name: str) -> APIError:
    return APIError(f"no stored vector is named {name!r}", param="name", code="vector_not_found",
                    status=HTTPStatus.NOT_FOUND)


def _get(request: Request, name: str):
    vector = _store(request).get(name)
    if vector is None:
        raise _not_found(name)
    return vector


@router.get("/v1/steering/vectors/{name}", response_model=StoredVectorObject, response_model_exclude_unset=True)
async def retrieve_vector(name: str, request: Request) -> dict[str, Any]:
    return _get(request, name).public(with_data=True)


@router.delete("/v1/steering/vectors/{name}", response_model=VectorDeleted)
async def delete_vector(name: str, request: Request) -> dict[str, Any]:
    if not await asyncio.to_thread(_store(request).delete, name):  # the store's answer: another may have won
        raise _not_found(name)
    return {"object": "steering.vector", "name": name, "deleted": True}
