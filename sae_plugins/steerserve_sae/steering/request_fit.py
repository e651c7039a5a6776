"""Whether a request's spec fits this worker's tables and loaded SAEs. The API never sends one
that does not (it validates first); a worker checks anyway, because request data must never
raise inside a step: runtime.py turns a ValueError from here into a logged, counted refusal."""

from __future__ import annotations

from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.protocol.spec import FeatureEdit, SteeringSpec
from steerserve_sae.sae.autoencoder import SAEWeights


def check_fits(spec: SteeringSpec | None, capture: CaptureSpec | None, config: PluginConfig,
               saes: dict[int, SAEWeights], d_model: int = 0, local: set[int] | None = None) -> None:
    """ValueError naming the first thing that does not fit; `saes` are this stage's SAEs, `local`
    this stage's steered layers (default: the SAEs'), `d_model` the stream's width."""
    all_layers = set(config.sae_layers)  # every pipeline stage's, not only this one's
    vector_layers = set(config.vector_layers)
    local = set(saes) if local is None else local
    d_model = d_model or next((sae.d_model for sae in saes.values()), 0)
    if spec is not None and len(spec.features) > config.max_features:
        raise ValueError(f"{len(spec.features)} features; the tables hold {config.max_features}")
    if spec is not None and len(spec.vectors) > config.max_vectors:
        raise ValueError(f"{len(spec.vectors)} vectors; the tables hold {config.max_vectors}")
    if spec is not None and len(spec.gates) > config.max_features:
        raise ValueError(f"{len(spec.gates)} gates; the gate state holds {config.max_features}")

    def check_feature(what: str, layer: int, index: int) -> None:
        if layer not in all_layers:
            raise ValueError(f"{what} at layer {layer}, which has no SAE loaded")
        sae = saes.get(layer)
        if sae is not None and not 0 <= index < sae.d_sae:
            raise ValueError(f"{what} index {index} out of range at layer {layer}")

    for v in spec.vectors if spec else ():
        if v.layer not in vector_layers:
            raise ValueError(f"vector at layer {v.layer}, which has neither an SAE nor --steering-layers")
        if v.layer in local and v.values().size != d_model:
            raise ValueError(f"vector of {v.values().size} values at layer {v.layer} (d_model {d_model})")
    for f in (*spec.features, *spec.vectors) if spec else ():
        if isinstance(f, FeatureEdit):
            check_feature("feature", f.layer, f.index)
        if f.when is None:
            continue
        check_feature("gate feature", f.when.layer, f.when.index)
        if (f.layer in local) != (f.when.layer in local):
            raise ValueError(f"gate at layer {f.when.layer} and its edit at layer {f.layer} sit on "
                             "different pipeline stages")
    if capture is not None and capture.dashboard is not None and capture.dashboard.problem():
        raise ValueError(f"dashboard spec: {capture.dashboard.problem()[1]}")
    for layer in capture.layers if capture else ():
        if layer not in all_layers:
            raise ValueError(f"capture at layer {layer}, which has no SAE loaded")
        sae = saes.get(layer)
        if sae is not None and not 1 <= capture.top_k <= sae.d_sae:
            raise ValueError(f"capture top_k {capture.top_k} out of range at layer {layer}")
        if sae is not None and not all(0 <= i < sae.d_sae for i in capture.watch):
            raise ValueError(f"capture watches a feature out of range at layer {layer}")
