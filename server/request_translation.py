"""Turning an OpenAI request with a `steering` field into a stock vLLM request.

The spec travels to the workers in `vllm_xargs` (which vLLM copies into
`SamplingParams.extra_args`), and the steering id is folded into `cache_salt` so steered
requests never share prefix-cache blocks with unsteered or differently steered ones.
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


def translate_request(body: dict, sae_sizes: dict[int, int], max_features: int) -> Translation:
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and EXTRA_ARGS_KEY in xargs:
        raise APIError(
            f"vllm_xargs.{EXTRA_ARGS_KEY} is reserved; use the `steering` field",
            param=f"vllm_xargs.{EXTRA_ARGS_KEY}",
            code="reserved_field",
        )
    if body.get("steering") is None:
        body.pop("steering", None)
        return Translation(body, None)
    spec, compare = parse_steering(body.pop("steering"), sae_sizes, max_features)
    baseline = None
    if compare:
        if body.get("stream"):
            raise APIError("steering.compare cannot be combined with stream", param="steering.compare",
                           code="invalid_steering")
        baseline = copy.deepcopy(body)
    body["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), EXTRA_ARGS_KEY: spec.to_extra_arg()}
    salt = body.get("cache_salt")
    body["cache_salt"] = f"{salt}:{spec.id}" if isinstance(salt, str) and salt else spec.id
    return Translation(body, spec, baseline)
