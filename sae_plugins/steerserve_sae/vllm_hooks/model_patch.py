"""Making the chosen decoder layers call the steering op (architectures.py finds them).

Each steered layer's class is swapped for a subclass whose forward runs the original and then
the custom op on its output. The swap happens right after the weights load and before vLLM's
first (compiling) forward, so the op is part of the traced graph. Attribute names, parameter
names and isinstance checks are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def is_local_layer(layer: nn.Module) -> bool:
    """False for pipeline-parallel placeholders of layers another stage owns."""
    return type(layer).__name__ != "PPMissingLayer"


_steered_classes: dict[type, type] = {}


def _steered_class(base: type) -> type:
    if base not in _steered_classes:

        def forward(self, *args, **kwargs):
            hidden_states, residual = base.forward(self, *args, **kwargs)
            torch.ops.steerserve.steer_residual(hidden_states, residual, self.steerserve_layer)
            return hidden_states, residual

        _steered_classes[base] = type(f"Steered{base.__name__}", (base,), {"forward": forward})
    return _steered_classes[base]


def steer_layer(layer: nn.Module, layer_index: int) -> None:
    if type(layer).__name__.startswith("Steered"):
        return
    layer.steerserve_layer = layer_index
    layer.__class__ = _steered_class(type(layer))
