"""References to the loaded SAEs in a request (a layer, a feature index) checked the same way on
every route: one message and one error code each, `param` naming where the reference was."""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus

from steerserve.errors import APIError


def loaded_layer(sae_sizes: dict[int, int], layer: int, param: str, status: int = HTTPStatus.BAD_REQUEST,
                 vector_layers: Collection[int] = ()) -> int:
    """d_sae of the SAE at `layer`, which must be loaded (`layer_not_loaded`); `vector_layers`,
    the layers steered by direction vectors only, are named as such in the message."""
    if layer not in sae_sizes:
        only = " (it takes direction vectors only: --steering-layers)" if layer in vector_layers else ""
        raise APIError(f"no SAE is loaded at layer {layer}{only}; loaded layers: {sorted(sae_sizes)}", param=param,
                       code="layer_not_loaded", status=status)
    return sae_sizes[layer]


def index_in_range(d_sae: int, layer: int, index: int, param: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
    """Feature `index` must exist in the SAE at `layer` (`index_out_of_range`)."""
    if not 0 <= index < d_sae:
        raise APIError(f"feature index {index} is out of range for layer {layer} (0..{d_sae - 1})", param=param,
                       code="index_out_of_range", status=status)
