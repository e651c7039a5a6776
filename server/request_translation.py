"""Turning an OpenAI request with a `steering` field into a stock vLLM request.

The spec travels to the workers in `vllm_xargs` (which vLLM copies into
`SamplingParams.extra_args`), signed so the workers know the API validated it, and the steering
id is folded into `cache_salt` so steered requests never share prefix-cache blocks with
unsteered or differently steered ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from sae_plugins.steering_spec import EXTRA_ARGS_KEY, SteeringSpec

from .errors import APIError
from .steering_schema import parse_steering


@dataclass
class Translation:
    body: dict  # what vLLM receives
    spec: SteeringSpec | None  # None: the request is unsteered
    baseline_body: dict | None = None  # the same request unsteered, when `steering.compare` is set
    body_changed: bool = False  # an unsteered body that differs from what the client sent


def translate_request(body: dict, sae_sizes: dict[int, int], max_features: int, max_value: float) -> Translation:
    """`body` has passed request_guard's checks (reserved keys, vllm_xargs, cache_salt)."""
    if body.get("steering") is None:
        had_key = "steering" in body
        body.pop("steering", None)
        return Translation(body, None, body_changed=had_key)
    spec, compare = parse_steering(body.pop("steering"), sae_sizes, max_features, max_value)
    baseline = None
    if compare:
        if body.get("stream"):
            raise APIError("steering.compare cannot be combined with stream", param="steering.compare",
                           code="invalid_steering")
        baseline = copy.deepcopy(body)
    xargs = body.get("vllm_xargs") or {}
    body["vllm_xargs"] = {**xargs, EXTRA_ARGS_KEY: spec.to_extra_arg()}
    salt = body.get("cache_salt")
    body["cache_salt"] = f"{salt}:{spec.id}" if salt else spec.id
    return Translation(body, spec, baseline)
