"""Steerserve's own HTTP routes beside vLLM's OpenAI API."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/saes")
async def list_saes(request: Request) -> dict:
    """What can be steered: one entry per loaded SAE layer."""
    return {"object": "list", "data": request.app.state.steerserve.saes}
