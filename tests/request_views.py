"""Scheduled requests spelled out one by one, for driving a SteeringRuntime without vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steerserve_sae.steering.runtime import StepBatch


@dataclass
class RequestView:
    req_id: str
    extra_args: dict | None
    num_scheduled: int
    num_computed: int
    num_prompt: int

    @staticmethod
    def batch(views: list["RequestView"]) -> StepBatch:
        extra = {v.req_id: v.extra_args for v in views}
        return StepBatch(
            [v.req_id for v in views],
            np.array([v.num_scheduled for v in views], dtype=np.int64),
            np.array([v.num_computed for v in views], dtype=np.int64),
            np.array([v.num_prompt for v in views], dtype=np.int64),
            extra.get,
        )
