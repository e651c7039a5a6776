"""The worker's steering state, found in one place: the custom op, the runner hooks and the
collective-RPC methods all look it up here (as vLLM's ops look up the forward context), so no
module hands another a callback. Set once per worker process when the model loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steerserve_sae.capture.logit_lens import FeatureLens
    from steerserve_sae.steering.runtime import SteeringRuntime

_runtime: "SteeringRuntime | None" = None
_lens: "FeatureLens | None" = None


def install(runtime: "SteeringRuntime", lens: "FeatureLens") -> None:
    global _runtime, _lens
    _runtime, _lens = runtime, lens


def runtime() -> "SteeringRuntime | None":
    return _runtime


def lens() -> "FeatureLens | None":
    return _lens
