"""How many tokens a prompt is, counted once for everything that must know before it runs:
inspect (routers/features.py) and a trace with residuals at every position (steering/traces.py).

A chat prompt is rendered by vLLM's own renderer, through this server's /tokenize: the renderer
chat completions use, with vLLM's message handling before the template (tool-call arguments sent
as JSON strings become the mappings Qwen3.5's template iterates, an assistant's `reasoning`
reaches the template as `reasoning_content`), which a bare apply_chat_template on the client's
messages lacks. A text prompt is split by the served tokenizer off the event loop; a list of
token ids is its own count. Nothing is tokenized past a bound of `max_inspect_chars_per_token`
characters per token that may fit, counting characters as the client wrote them (JSON escapes
would count one CJK character as six, and refuse inputs that fit).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from steerserve.errors import APIError

# What vLLM's chat template call reads from a chat request (its /tokenize takes the same fields).
CHAT_PROMPT_FIELDS = ("messages", "tools", "add_generation_prompt", "continue_final_message", "chat_template",
                      "chat_template_kwargs")


async def prompt_token_ids(context: Any, request: dict, field: str, max_tokens: int) -> list[int] | None:
    """The token ids of the prompt `request[field]` ("messages": a chat, rendered with the request's
    template fields; "prompt": a text or token ids), None for a prompt that is neither (vLLM
    refuses it with its own 400). An input without tokens, or of more than `max_tokens`, is a 400
    naming `field`; so is a chat vLLM cannot render."""
    prompt = request.get(field)
    if field == "prompt" and isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        token_ids = prompt
    elif field == "messages" or isinstance(prompt, str):
        chars = len(prompt) if isinstance(prompt, str) else len(json.dumps(prompt, ensure_ascii=False))
        max_chars = max_tokens * context.limits.max_inspect_chars_per_token
        if chars > max_chars:
            raise APIError(f"the input has {chars} characters; at most {max_chars} can fit in {max_tokens} tokens",
                           param=field, code="too_many_tokens")
        if field == "messages":
            token_ids = await chat_prompt_ids(context.client, context.served_model, request)
        else:
            token_ids = await asyncio.to_thread(context.engine.get_tokenizer().encode, prompt)
    else:
        return None
    if not token_ids:
        raise APIError("the input has no tokens", param=field, code="empty_input")
    if len(token_ids) > max_tokens:
        raise APIError(f"the input has {len(token_ids)} tokens; at most {max_tokens} fit", param=field,
                       code="too_many_tokens")
    return token_ids


async def chat_prompt_ids(client: Any, model: str, request: dict) -> list[int]:
    """The token ids vLLM makes of a chat request's prompt, from this server's own /tokenize
    (`client`: in_process.in_process_client). What vLLM cannot render is a 400 naming `messages`."""
    body = {"model": model, **{key: request[key] for key in CHAT_PROMPT_FIELDS if key in request}}
    response = await client.post("/tokenize", content=json.dumps(body), headers={"content-type": "application/json"})
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = response.text
        raise APIError(f"cannot render the chat prompt: {reason}", param="messages", code="invalid_request")
    return response.json()["tokens"]
