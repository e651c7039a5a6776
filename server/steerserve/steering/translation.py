"""Turning an OpenAI request with `steering` and/or `trace` fields into a stock vLLM request.

The spec travels to the workers in `vllm_xargs` (which vLLM copies into
`SamplingParams.extra_args`), signed so the workers know the API validated it, and the steering
id is folded into `cache_salt` so steered requests never share prefix-cache blocks with
unsteered or differently steered ones (see `cache_salt` for position-dependent steering). A spec
with gates also gets a report id, under which the workers count the tokens that passed each gate.
Every request that carries a signed spec also gets a ticket, under which a worker that refuses
the spec says so (sae_plugins/steerserve_sae/capture/rejections.py).
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass

from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY, GATE_REPORT_KEY, TICKET_KEY, report_extra_arg
from steerserve_sae.protocol.spec import SteeringSpec

from steerserve.errors import APIError
from steerserve.limits import Limits
from steerserve.steering.schema import parse_steering
from steerserve.steering.traces import attach_trace, parse_trace
from steerserve.steering.vector_store import VectorStore, resolve_names


@dataclass
class Translation:
    body: dict  # what vLLM receives
    spec: SteeringSpec | None  # None: the request is unsteered
    baseline_body: dict | None = None  # the same request unsteered, when `steering.compare` is set
    body_changed: bool = False  # an unsteered body that differs from what the client sent
    gate_report: str | None = None  # the workers' gate report id, for a spec with gates
    trace: CaptureSpec | None = None  # the request's trace (server/steerserve/steering/traces.py)
    baseline_trace: CaptureSpec | None = None  # the baseline's own trace, when both are asked for
    ticket: str | None = None  # where a worker records refusing the request's spec (rejections.py)
    preset: str | None = None  # the preset the request named as its model (server/steerserve/steering/presets.py)
    vector_names: dict[tuple[int, str], str] | None = None  # stored vectors named by the request, for the echo

    @property
    def extended(self) -> bool:
        """The response needs more than vLLM writes: a steering echo or a trace."""
        return self.spec is not None or self.trace is not None


def translate_request(body: dict, sae_sizes: dict[int, int], max_features: int, limits: Limits,
                      stages: tuple[frozenset[int], ...] = (), prompt_tokens: int | None = None,
                      max_model_len: int | None = None, d_model: int = 0,
                      vectors: VectorStore | None = None, vector_layers: frozenset[int] = frozenset()
                      ) -> Translation:
    """`body` has passed middleware/guard.py's checks (reserved keys, vllm_xargs, cache_salt);
    d_model: the residual stream's width (the length of a steering vector);
    prompt_tokens: its prompt's token count, where a trace needs it (traces.prompt_tokens_for_residuals);
    max_model_len: the context, which bounds what a trace may return;
    vectors: the stored vectors a spec may name instead of giving base64;
    vector_layers: the layers without an SAE that direction vectors may steer (--steering-layers)."""
    had_fields = "steering" in body or "trace" in body
    raw_trace = body.pop("trace", None)
    trace = parse_trace(raw_trace, sae_sizes, body, limits.max_trace_features, limits.max_trace_residuals,
                        prompt_tokens, max_model_len) if raw_trace is not None else None
    if body.get("steering") is None:
        body.pop("steering", None)
        capture = attach_trace(body, trace) if trace is not None else None
        return Translation(body, None, body_changed=had_fields, trace=capture,
                           ticket=_ticket(body) if capture is not None else None)
    vector_names = resolve_names(body["steering"], vectors)
    spec, compare = parse_steering(body.pop("steering"), sae_sizes, max_features, limits.max_steering_value, stages,
                                   d_model, limits.max_steering_vectors, vector_layers)
    baseline = baseline_trace = None
    if compare:
        if body.get("stream"):
            raise APIError("steering.compare cannot be combined with stream", param="steering.compare",
                           code="invalid_steering")
        baseline = copy.deepcopy(body)
        baseline_trace = attach_trace(baseline, trace) if trace is not None else None
    xargs = {**(body.get("vllm_xargs") or {}), EXTRA_ARGS_KEY: spec.to_extra_arg()}
    report = f"gates-{uuid.uuid4().hex}" if spec.gates else None
    if report is not None:
        xargs[GATE_REPORT_KEY] = report_extra_arg(report)
    body["vllm_xargs"] = xargs
    body["cache_salt"] = cache_salt(body.get("cache_salt"), spec)
    capture = attach_trace(body, trace) if trace is not None else None
    return Translation(body, spec, baseline, gate_report=report, trace=capture, baseline_trace=baseline_trace,
                       ticket=_ticket(body), vector_names=vector_names)


def _ticket(body: dict) -> str:
    ticket = uuid.uuid4().hex
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), TICKET_KEY: ticket}
    return ticket


def cache_salt(client_salt: str | None, spec: SteeringSpec) -> str:
    """The prefix-cache namespace of a steered request (vLLM folds it into every block hash).

    With `apply_to: "all"` a token's cached state depends only on the tokens before it and the
    spec, so requests with equal specs share blocks. With "prompt" or "generation" it also
    depends on whether the token was a prompt or a generated token *of the request that
    computed it*: a later request whose prompt contains an earlier one's output must not reuse
    those blocks, so each such request gets a namespace of its own (no prefix caching for it).
    """
    namespace = spec.id if spec.apply_to == "all" else f"{spec.id}:{uuid.uuid4().hex}"
    return f"{client_salt}:{namespace}" if client_salt else namespace
