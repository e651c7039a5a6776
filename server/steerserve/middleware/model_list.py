"""`GET /v1/models` with every steering preset this server serves listed after vLLM's own entries,
each in the shape vLLM gives a LoRA adapter (server/steerserve/steering/presets.py `Preset.card`): clients
that can only pick a model find the presets where they look for models. The presets are read and
checked off the event loop: up to --max-presets of them, each spec up to --max-preset-spec-bytes.
While a fleet's database is unreachable the list has the served models only (docs/fleet.md)."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.types import Message, Send

from steerserve.db import UNAVAILABLE
from steerserve.errors import APIError

logger = logging.getLogger("vllm.steerserve")

MODELS_PATH = "/v1/models"


class PresetModelsSend:
    """Buffers vLLM's model list (one small JSON body) and appends the presets' cards; any other
    answer (an error, a non-JSON body) passes unchanged."""

    def __init__(self, send: Send, context):
        self._send = send
        self._context = context
        self._start: Message | None = None
        self._buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and content_type.startswith(b"application/json"):
                self._start = message
                return
        if self._start is None or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._buffer += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = await self._with_presets(self._buffer)
        headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
        await self._send({**self._start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def _with_presets(self, raw: bytes) -> bytes:
        try:
            listing = json.loads(raw)
        except ValueError:
            return raw
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            return raw
        context = self._context
        try:
            presets = await asyncio.to_thread(lambda: context.preset_check.served(context.presets.all()))
        except APIError as error:  # the fleet's database is unreachable: the served models still are
            if error.code != UNAVAILABLE:
                raise
            logger.warning("steerserve: /v1/models lists no presets: %s", error.message)
            return raw
        listing["data"].extend(p.card(context.served_model, context.max_model_len) for p in presets)
        return json.dumps(listing).encode()
