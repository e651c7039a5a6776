"""ASGI middleware: guards every JSON request body, and adds `steering` to the completion routes.

Every POST/PUT/PATCH body except multipart uploads is read here once, the way the handler will
read it (body_reading.py: one Content-Type, declared JSON), bounded in size, parsed with a bounded
depth, and checked for the plugin's reserved `vllm_xargs` keys and the client priority range
(guard.py), so no route of vLLM's or ours can hand the workers an unchecked spec, let a
client jump the queue, or crash on hostile JSON.
On the steerable routes a `model` that names a steering preset is first resolved to the served
model steered by the preset (server/steerserve/steering/presets.py; the response is named by the preset), on
the token-counting routes to the served model, and `GET /v1/models` gets the presets appended
(model_list.py).
On the steerable routes the body is then validated and translated (server/steerserve/steering/translation.py),
and the response, JSON or server-sent events, gets the normalised spec echoed back
(response_rewrite.py, with what response_end.py takes from the workers); any other
route refuses a `steering` field rather than ignore it. Unsteered requests pass through with
their body untouched. For a spec with gates, the echo at the end of the response (the JSON body,
or one last chunk before a stream's `[DONE]`) also says how many tokens each gate let through;
a `trace` (server/steerserve/steering/traces.py) arrives there too, per choice. A worker that refused the request's
spec (sae_plugins/steerserve_sae/capture/rejections.py) turns the response into a 500: before a stream's first event,
or instead of the JSON body, so an unsteered answer never goes out labelled as steered.
Whatever the workers keep for a response (gate report, traces, refusal) and the response did not
take, because its client left, its status was an error or it was cancelled, is discarded when
it ends, so the workers' store frees it; a result that outgrew that store is a 503 (or, mid-stream,
an error event).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerserve_sae.protocol.rpc import Wanted

from steerserve.middleware.api_shapes import api_shape
from steerserve.middleware.body_reading import BodyChannel, check_headers, read_json_body, reads_json, refuse
from steerserve.errors import APIError
from steerserve.middleware.guard import (
    check_cache_salt, check_priority, check_route_takes_steering, check_vllm_xargs, is_steerable, parse_json_body,
)
from steerserve.middleware.response_end import asked_keys, response_end, stream_rejection, trace_keys, trace_pieces
from steerserve.middleware.model_list import MODELS_PATH, PresetModelsSend
from steerserve.middleware.response_rewrite import EchoingSend
from steerserve.steering.presets import named_by_preset, resolve_model, served_model_for
from steerserve.steering.translation import translate_request
from steerserve.steering.traces import num_choices, prompt_tokens_for_residuals, take_traces


# Routes that take a `model` but generate nothing: a preset's name there means the served model.
COUNTING_PATHS = ("/v1/messages/count_tokens", "/tokenize", "/detokenize")


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hands the (rewritten) body over once, then the real channel: vLLM watches it to cancel
    generation when the client disconnects."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_length(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


class SteeringMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            # A scrape shows the last snapshot of the workers' counters and asks for a new one
            # (debounced), so counters also move while only unsteered traffic runs.
            scope["app"].state.steerserve.metrics.schedule_refresh()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = scope["app"].state.steerserve
        channel = BodyChannel(receive)
        reading = reads_json(scope)
        try:
            check_headers(scope)
            body, payload = await self._read_checked(scope, channel, context.limits) if reading else (b"", None)
        except APIError as error:
            await refuse(error, scope, channel, send, context.limits.max_request_bytes)
            return
        if not reading:
            listing = scope["path"] == MODELS_PATH and scope["method"] == "GET" and context.presets is not None
            await self.app(scope, receive, PresetModelsSend(send, context) if listing else send)
            return
        translation = None
        if isinstance(payload, dict) and scope["path"] in COUNTING_PATHS:
            try:
                counted = served_model_for(payload, context.presets, context.preset_check, context.served_model)
            except APIError as error:
                await error.response()(scope, _replay(b"", receive), send)
                return
            body = body if counted is payload else json.dumps(counted).encode()
        if isinstance(payload, dict) and is_steerable(scope["path"]):
            try:
                payload, preset = resolve_model(payload, context.presets, context.preset_check, context.served_model)
                api_shape(scope["path"]).check_request(payload)
                prompt_tokens = await prompt_tokens_for_residuals(context, payload)
                translation = translate_request(payload, context.sae_sizes, context.max_features, context.limits,
                                                context.sae_stages, prompt_tokens, context.max_model_len,
                                                context.d_model, context.vectors, context.vector_layers)
                translation.preset = preset.name if preset is not None else None
            except APIError as error:
                context.metrics.validation_error(error.code)
                await error.response()(scope, _replay(b"", receive), send)
                return
        if translation is None or not translation.extended:
            if translation is not None and translation.body_changed:  # a `"steering": null` was dropped
                body = json.dumps(translation.body).encode()
            await self.app(_with_length(scope, body), _replay(body, receive), send)
            return
        await self._extended(scope, receive, send, context, translation)

    async def _read_checked(self, scope: Scope, receive: BodyChannel, limits) -> tuple[bytes, Any]:
        """The body and its parsed JSON (None when empty), after every check that applies to
        any route."""
        body = await read_json_body(scope, receive, limits.max_request_bytes)
        if not body.strip():
            return body, None
        payload = parse_json_body(body, limits.max_json_depth)
        if isinstance(payload, dict):
            check_vllm_xargs(payload)
            check_priority(payload, limits.client_priority_range)
            if is_steerable(scope["path"]):
                check_cache_salt(payload)
            else:
                check_route_takes_steering(scope["path"], payload)
        return body, payload

    async def _extended(self, scope: Scope, receive: Receive, send: Send, context, translation) -> None:
        """A steered and/or traced request: the response gets the echo, the baseline, the gate
        report and the traces. What it asked the workers to keep and did not take is discarded."""
        untaken: set[Wanted] = set()
        try:
            await self._respond_extended(scope, receive, send, context, translation, untaken)
        finally:
            if untaken:
                context.takes.discard(sorted(untaken))

    async def _respond_extended(self, scope: Scope, receive: Receive, send: Send, context, translation,
                                untaken: set[Wanted]) -> None:
        spec = translation.spec
        additions: dict[str, Any] = {} if spec is None else {
            "steering": spec.echo(vector_names=translation.vector_names)}
        final = response_end(context, translation, untaken)
        if translation.preset is not None:  # the response names the preset as its model
            additions, final = named_by_preset(additions, final, translation.preset)
        if translation.baseline_body is not None:
            baseline = json.dumps(translation.baseline_body).encode()
            baseline_keys = trace_keys(translation.baseline_trace, num_choices(translation.baseline_body))
            untaken.update(baseline_keys)
            start, content = await self._collect(_with_length(scope, baseline), _replay(baseline, receive))
            if start["status"] != 200:  # the unsteered twin failed: that answer stands
                await send(start)
                await send({"type": "http.response.body", "body": content, "more_body": False})
                return
            additions["baseline"] = json.loads(content)
            if translation.baseline_trace is not None:
                untaken.difference_update(baseline_keys)
                try:
                    traces = await take_traces(context, translation.baseline_trace,
                                               num_choices(translation.baseline_body))
                except APIError as error:  # the workers' store was full: nothing has been sent yet
                    await error.response()(scope, _replay(b"", receive), send)
                    return
                for choice in additions["baseline"].get("choices", []):
                    choice["trace"] = traces.get(choice.get("index"), [])
        new_body = json.dumps(translation.body).encode()
        untaken.update(asked_keys(translation))
        echoing = EchoingSend(send, additions, final,
                              trace_pieces(context, translation), stream_rejection(context, translation, untaken),
                              api_shape(scope["path"]))
        if spec is None:
            await self.app(_with_length(scope, new_body), _replay(new_body, receive), echoing)
            return
        context.metrics.steered_request()
        try:
            async with context.admission.admit(spec.id):
                await self.app(_with_length(scope, new_body), _replay(new_body, receive), echoing)
        finally:
            context.metrics.schedule_refresh()

    async def _collect(self, scope: Scope, receive: Receive) -> tuple[Message, bytes]:
        """Runs the app to completion and returns its response start message and body."""
        messages: list[Message] = []

        async def collect(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, collect)
        start = next(m for m in messages if m["type"] == "http.response.start")
        return start, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
