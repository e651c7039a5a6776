"""`GET /v1/saes`: what can be steered, one entry per loaded SAE layer."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from steerserve_sae.protocol.rpc import SAEInfo

from steerserve.routers.route import SteerserveRoute

router = APIRouter(route_class=SteerserveRoute)


class SAEList(BaseModel):
    object: Literal["list"]
    data: list[SAEInfo]


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": request.app.state.steerserve.saes}
