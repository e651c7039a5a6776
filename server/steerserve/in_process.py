"""An HTTP client that calls this server's own ASGI app in-process (no socket).

Batch lines, inspect forwards and chat prompt counts (prompt_tokens.py) go through exactly the
path an interactive request takes: the steering middleware's validation and translation, vLLM's
OpenAI handlers, the same error objects. There is no second code path to drift apart.
"""

from __future__ import annotations

from typing import Any

import httpx

from steerserve.middleware.auth import api_keys


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
