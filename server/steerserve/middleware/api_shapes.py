"""Where each steerable API keeps the steering echo in its responses, and what it cannot take.

Chat and text completions (and /invocations) put the echo on every chunk and the end of the
response (a gated spec's counts, traces) in one more chunk before `[DONE]`. The Responses API
(`/v1/responses`) and Anthropic's Messages API (`/v1/messages`) have response objects and named
events of their own: the echo goes in the response object (`response.created`/`in_progress`/
`completed` events carry it as `response`; `message_start` as `message`), and the end of the
response in the event that ends it (`response.completed`, `response.incomplete`; `message_delta`,
which carries the stop reason). Neither has choices, so `trace` and `steering.compare` (whose
answers are per choice) are refused there rather than ignored.
"""

from __future__ import annotations

import json

from steerserve.errors import APIError


class CompletionsShape:
    """/v1/chat/completions, /v1/completions, /invocations: every data event is a chunk."""

    ends_with_done = True  # the end of the response is one more chunk before `data: [DONE]`

    def check_request(self, payload: dict) -> None:
        """Everything the steering schema accepts works here."""

    def echo_target(self, event: dict) -> dict | None:
        return event

    def end_target(self, event: dict) -> dict | None:
        """The object of this event that takes the end-of-response fields; None: not this event."""
        return None

    def before_generation(self, events: bytes) -> bool:
        """Whether these stream events all go out before the first token (a worker's refusal of
        the spec is known only after it: response_end.stream_rejection)."""
        return False

    def error_event(self, error: APIError) -> bytes:
        return b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"


class _ObjectShape(CompletionsShape):
    """An API whose stream events are named, and whose response object some events carry."""

    ends_with_done = False
    path = ""
    object_key = ""  # the key of the event that carries the response object
    end_events: tuple[str, ...] = ()

    def check_request(self, payload: dict) -> None:
        if payload.get("trace") is not None:
            raise APIError(f"trace is not supported on {self.path}; use /v1/chat/completions or /v1/completions",
                           param="trace", code="steering_unsupported_route")
        steering = payload.get("steering")
        if isinstance(steering, dict) and steering.get("compare") not in (None, False):
            raise APIError(f"steering.compare is not supported on {self.path}; use /v1/chat/completions or "
                           "/v1/completions", param="steering.compare", code="steering_unsupported_route")

    def echo_target(self, event: dict) -> dict | None:
        target = event.get(self.object_key)
        return target if isinstance(target, dict) else None

    def end_target(self, event: dict) -> dict | None:
        return self._end_object(event) if event.get("type") in self.end_events else None

    def _end_object(self, event: dict) -> dict | None:
        return self.echo_target(event)


class ResponsesShape(_ObjectShape):
    path = "/v1/responses"
    object_key = "response"
    end_events = ("response.completed", "response.incomplete")
    _opening = (b"event: response.created\n", b"event: response.in_progress\n")

    def before_generation(self, events: bytes) -> bool:
        return all(event.startswith(self._opening) for event in events.split(b"\n\n") if event.strip())

    def error_event(self, error: APIError) -> bytes:
        body = {"type": "error", **error.body()["error"]}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


class MessagesShape(_ObjectShape):
    path = "/v1/messages"
    object_key = "message"
    end_events = ("message_delta",)

    def _end_object(self, event: dict) -> dict | None:
        return event  # message_delta has no message object: the counts sit beside its delta and usage

    def error_event(self, error: APIError) -> bytes:
        body = {"type": "error", "error": {"type": error.type, "message": error.message}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


COMPLETIONS = CompletionsShape()
_BY_PATH: dict[str, CompletionsShape] = {"/v1/responses": ResponsesShape(), "/v1/messages": MessagesShape()}


def api_shape(path: str) -> CompletionsShape:
    """The shape of a steerable route's responses (guard.is_steerable said it is steerable)."""
    return next((shape for suffix, shape in _BY_PATH.items() if path.endswith(suffix)), COMPLETIONS)

