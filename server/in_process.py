"""An HTTP client that calls this server's own ASGI app in-process (no socket).

Batch lines and inspect forwards go through exactly the path an interactive request takes:
the steering middleware's validation and translation, vLLM's OpenAI handlers, the same
error objects. There is no second code path to drift apart.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from steerserve.middleware.auth import api_keys
from steerserve.errors import APIError

# What vLLM's chat template call reads from a chat request (its /tokenize takes the same fields).
CHAT_PROMPT_FIELDS = ("messages", "tools", "add_generation_prompt", "continue_final_message", "chat_template",
                      "chat_template_kwargs")


def server_api_key(args: Any) -> str | None:
    """The key in-process calls present when the server requires one (--api-key / VLLM_API_KEY)."""
    return next(iter(api_keys(args)), None)


def in_process_client(app: Any, api_key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://steerserve.internal",
        headers=headers,
        timeout=None,
    )


async def chat_prompt_ids(client: httpx.AsyncClient, model: str, request: dict) -> list[int]:
    """The token ids vLLM makes of a chat request's prompt, from this server's own /tokenize: the
    renderer chat completions use, with vLLM's message handling before the template (tool-call
    arguments sent as JSON strings become the mappings Qwen3.5's template iterates, an assistant's
    `reasoning` reaches the template as `reasoning_content`), which a bare apply_chat_template on
    the client's messages lacks. What vLLM cannot render is a 400 naming `messages`."""
    body = {"model": model, **{key: request[key] for key in CHAT_PROMPT_FIELDS if key in request}}
    response = await client.post("/tokenize", content=json.dumps(body), headers={"content-type": "application/json"})
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = response.text
        raise APIError(f"cannot render the chat prompt: {reason}", param="messages", code="invalid_request")
    return response.json()["tokens"]
