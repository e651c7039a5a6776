"""`GET /v1/saes`: what can be steered, one entry per loaded SAE layer, and the layers that only
direction vectors steer."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from steerserve_sae.protocol.rpc import SAEInfo

from steerserve.routers.route import SteerserveRoute

router = APIRouter(route_class=SteerserveRoute)


class SAEList(BaseModel):
    object: Literal["list"]
    data: list[SAEInfo]
    vector_layers: list[int] = Field(description="layers without an SAE that direction vectors steer "
                                                 "(--steering-layers); every SAE layer takes vectors too")
    d_model: int = Field(description="the residual stream's width: the length of a steering vector")


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(request: Request) -> dict[str, Any]:
    context = request.app.state.steerserve
    return {"object": "list", "data": context.saes, "vector_layers": sorted(context.vector_layers),
            "d_model": context.d_model}
