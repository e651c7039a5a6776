"""`/v1/steering/presets`: named steering specs that clients steer by as a `model`
(server/steerserve/steering/presets.py keeps them; the steering middleware resolves them)."""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictStr

from steerserve.errors import APIError
from steerserve.routers.route import SteerserveRoute
from steerserve.steering.presets import Preset, PresetStore, check_name, check_size, preset_exists, validate_spec
from steerserve.steering.schema import Steering

router = APIRouter(route_class=SteerserveRoute)
# The spec is passed on as sent: validate_spec checks it like an inline field, so its errors
# name `steering.features[i]...` exactly as on chat completions.
SteeringField = Annotated[Any, PlainValidator(lambda value: value, json_schema_input_type=Steering)]


class PresetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(description="1 to 64 characters of A-Z a-z 0-9 . _ : -; the model name clients pick")
    steering: SteeringField
    description: StrictStr | None = None


class PresetObject(BaseModel):
    object: Literal["steering.preset"]
    name: str
    steering: dict[str, Any]
    description: str | None
    created_at: int
    source: str = Field(description='"api", or the --steering-presets file it came from')
    status: Literal["served", "refused"] = Field(
        description="refused: checked at start-up (or when first seen), it does not fit this server")
    refused_because: str | None = Field(description="why it is refused, starting with the error code")


class PresetList(BaseModel):
    object: Literal["list"]
    data: list[PresetObject]


class PresetDeleted(BaseModel):
    object: Literal["steering.preset.deleted"]
    name: str
    deleted: bool


def _store(request: Request) -> PresetStore:
    store = request.app.state.steerserve.presets
    if store is None:
        raise APIError("presets are unavailable on this server", code="presets_unavailable")
    return store


def _not_found(name: str) -> APIError:
    return APIError(f"no steering preset named {name!r}", param="name", code="preset_not_found",
                    status=HTTPStatus.NOT_FOUND)


def model_name_taken(name: str, context, param: str) -> None:
    """A preset may not take a served model's or LoRA adapter's name: it would shadow it."""
    if name in context.model_names():
        raise APIError(f"{name!r} is the name of a served model or LoRA adapter", param=param,
                       code="model_name_taken", status=HTTPStatus.CONFLICT)


@router.post("/v1/steering/presets", response_model=PresetObject)
async def create_preset(request: Request, req: PresetCreate) -> dict[str, Any]:
    context = request.app.state.steerserve
    store = _store(request)
    name = check_name(req.name)
    model_name_taken(name, context, "name")
    check_size(req.steering, req.description, context.limits)
    validate_spec(req.steering, context)
    preset = Preset(name, req.steering, req.description, int(time.time()), "api")
    if not await asyncio.to_thread(store.put, preset, replace=False, max_count=context.limits.max_presets):
        raise preset_exists(name, "name")
    return preset.public(None)


@router.get("/v1/steering/presets", response_model=PresetList)
async def list_presets(request: Request) -> dict[str, Any]:
    store, check = _store(request), request.app.state.steerserve.preset_check
    return {"object": "list", "data": await asyncio.to_thread(lambda: [p.public(check.refusal(p)) for p in store.all()])}


@router.get("/v1/steering/presets/{name}", response_model=PresetObject)
async def get_preset(name: str, request: Request) -> dict[str, Any]:
    preset = _store(request).get(name)
    if preset is None:
        raise _not_found(name)
    return preset.public(request.app.state.steerserve.preset_check.refusal(preset))


@router.delete("/v1/steering/presets/{name}", response_model=PresetDeleted)
async def delete_preset(name: str, request: Request) -> dict[str, Any]:
    if not await asyncio.to_thread(_store(request).delete, name):  # may wait for another process's write
        raise _not_found(name)
    return {"object": "steering.preset.deleted", "name": name, "deleted": True}
