"""SAELens: `cfg.json` + `sae_weights.safetensors`, in the directory itself (one layer) or in one
subdirectory per layer; standard (ReLU), JumpReLU and TopK SAEs on a resid_post hook."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from steerserve_sae.sae.autoencoder import ActivationKind, SAEWeights
from steerserve_sae.sae.formats.base import NOT_RESID_POST, LayerDirFormat, SAELoadError
from steerserve_sae.sae.formats.checks import check_d_in, check_d_sae, check_k, check_shapes, convert, positive_int, \
    read_json, require_keys, safetensors_load, safetensors_shapes

_HOOK = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.(hook_[a-z_]+))?$")
_ACTIVATION: dict[str, ActivationKind] = {
    "standard": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
}


class SAELens(LayerDirFormat):
    name = "saelens"
    label = "SAELens"
    weights = "sae_weights.safetensors"
    layout = ("SAELens (cfg.json + sae_weights.safetensors, in the directory or in one subdirectory "
              "per layer)")

    def layer_of(self, d: Path) -> tuple[int | None, str | None]:
        """(layer, None) for a resid_post hook, else (None, why it cannot be used)."""
        cfg = _cfg(d / "cfg.json")
        hook = cfg.get("hook_name")
        if isinstance(hook, str) and (m := _HOOK.search(hook)):
            if m.group(2) not in (None, "hook_resid_post"):
                return None, f"hook {hook!r} {NOT_RESID_POST}"
            return int(m.group(1)), None
        if hook is not None and not (isinstance(hook, str) and hook.endswith("hook_resid_post")):
            return None, f"hook {hook!r} {NOT_RESID_POST}"
        layer = cfg.get("hook_layer")
        if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
            return layer, None
        return None, "no layer: expected hook_name like 'blocks.8.hook_resid_post' or hook_layer"

    def looked_for(self, root: Path, layer: int) -> str:
        return f"a subdirectory of {root} whose cfg.json hook is blocks.{layer}.hook_resid_post"

    def read(self, d: Path, layer: int, d_model: int, dtype: torch.dtype, device: torch.device | str) -> SAEWeights:
        cfg_path, path = d / "cfg.json", d / self.weights
        cfg = _cfg(cfg_path)
        arch, k = _architecture(cfg_path, cfg, d_model)
        shapes = safetensors_shapes(path)
        required = ["W_enc", "W_dec", "b_enc", "b_dec"]
        thr_key = None
        if arch == "jumprelu":
            # Inference files store `threshold`; some training checkpoints only `log_threshold`.
            old_style = "threshold" not in shapes and "log_threshold" in shapes
            thr_key = "log_threshold" if old_style else "threshold"
            required.append(thr_key)
        require_keys(path, shapes.keys(), tuple(required))
        layout: dict[str, tuple[str, ...]] = {
            "W_enc": ("d_model", "d_sae"),
            "W_dec": ("d_sae", "d_model"),
            "b_enc": ("d_sae",),
            "b_dec": ("d_model",),
        }
        if thr_key:
            layout[thr_key] = ("d_sae",)
        d_sae = check_shapes(path, {n: shapes[n] for n in layout}, layout, d_model)
        check_d_sae(path, cfg_path, "d_sae", cfg.get("d_sae"), d_sae)
        if k is not None:
            check_k(cfg_path, k, d_sae)
        extra = ["scaling_factor"] if "scaling_factor" in shapes else []
        sd = safetensors_load(path, list(layout) + extra)
        if "scaling_factor" in sd and not torch.all(sd["scaling_factor"] == 1):
            raise SAELoadError(
                f"{path}: scaling_factor other than 1 (finetuning_scaling_factor) is not supported"
            )

        threshold = None
        if thr_key:
            t = sd[thr_key]
            threshold = convert(t.exp() if thr_key == "log_threshold" else t, dtype, device)
        return SAEWeights(
            layer=layer,
            W_enc=convert(sd["W_enc"].t(), dtype, device),  # [d_in, d_sae] -> row i = feature i
            b_enc=convert(sd["b_enc"], dtype, device),
            W_dec=convert(sd["W_dec"], dtype, device),
            b_dec=convert(sd["b_dec"], dtype, device),
            activation=_ACTIVATION[arch],
            k=k,
            threshold=threshold,
            # SAELens' own default (SAEConfig and pre-6 configs alike) when the key is absent.
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            architecture=f"saelens/{arch}",
            source=str(path),
            hook_point="resid_post",
        )


def _cfg(path: Path) -> dict[str, Any]:
    """cfg.json flattened: SAELens >= 6 nests hook_name etc. under `metadata` (once `meta`)."""
    raw = read_json(path)
    cfg: dict[str, Any] = {}
    for nested in ("meta", "metadata"):
        if isinstance(raw.get(nested), dict):
            cfg.update(raw[nested])
    cfg.update({k: v for k, v in raw.items() if k not in ("meta", "metadata")})
    for old, new in (
        ("hook_point", "hook_name"),
        ("hook_point_layer", "hook_layer"),
        ("activation_fn_str", "activation_fn"),
    ):  # pre-6 SAELens names
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    return cfg


def _architecture(cfg_path: Path, cfg: dict[str, Any], d_model: int) -> tuple[str, int | None]:
    """The supported architecture cfg.json names, and its k (TopK only)."""
    arch = cfg.get("architecture") or "standard"
    act_fn = cfg.get("activation_fn") or "relu"
    if arch == "standard" and act_fn == "topk":  # pre-6 TopK SAEs were "standard" + topk fn
        arch = "topk"
    if arch == "gated":
        raise SAELoadError(
            f"{cfg_path}: architecture 'gated' is not supported (use standard, jumprelu or topk)"
        )
    if arch not in ("standard", "jumprelu", "topk"):
        raise SAELoadError(
            f"{cfg_path}: architecture {arch!r} is not supported; "
            "expected standard, jumprelu or topk"
        )
    if arch == "standard" and act_fn != "relu":
        raise SAELoadError(
            f"{cfg_path}: activation_fn {act_fn!r} is not supported; expected 'relu'"
        )
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise SAELoadError(
            f"{cfg_path}: normalize_activations is {norm!r}; only 'none' is supported "
            "(steering vectors would be in the wrong scale)"
        )
    reshape = cfg.get("reshape_activations")
    if reshape not in (None, "none"):
        raise SAELoadError(
            f"{cfg_path}: reshape_activations is {reshape!r}; only 'none' is supported"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAELoadError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    check_d_in(cfg_path, cfg.get("d_in"), d_model)
    if arch != "topk":
        return arch, None
    raw_k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if raw_k is None:
        raise SAELoadError(
            f"{cfg_path}: topk SAE without k; expected 'k' or activation_fn_kwargs.k"
        )
    return arch, positive_int(cfg_path, "k", raw_k)
