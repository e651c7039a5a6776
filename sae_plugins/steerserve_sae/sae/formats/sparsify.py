"""EleutherAI sparsify: one subdirectory per hookpoint (`layers.8/`), each with `cfg.json` +
`sae.safetensors`; plain TopK SAEs that encode (x - b_dec)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.sae.formats.base import LayerDirFormat, SAELoadError
from steerserve_sae.sae.formats.checks import check_d_in, check_d_sae, check_k, check_shapes, convert, positive_int, \
    read_json, require_keys, safetensors_load, safetensors_shapes

_HOOK = re.compile(r"(?:^|\.)(\d+)$")  # "layers.8", "model.layers.8"


class Sparsify(LayerDirFormat):
    name = "sparsify"
    label = "sparsify"
    weights = "sae.safetensors"
    layout = ("EleutherAI sparsify (one subdirectory per hookpoint such as layers.8/, "
              "each with cfg.json + sae.safetensors)")

    def layer_of(self, d: Path) -> tuple[int | None, str | None]:
        m = _HOOK.search(d.name)
        if m is None:
            return None, "hookpoint is not a decoder layer's output, e.g. layers.8"
        return int(m.group(1)), None

    def problem_at(self, d: Path) -> Path:
        return d  # the hookpoint is the directory's name

    def looked_for(self, root: Path, layer: int) -> str:
        return str(root / f"layers.{layer}")

    def read(self, d: Path, layer: int, d_model: int, dtype: torch.dtype, device: torch.device | str) -> SAEWeights:
        cfg_path, path = d / "cfg.json", d / self.weights
        cfg = read_json(cfg_path)
        for flag in ("skip_connection", "transcode", "embed_skip", "gram_lookup"):
            if cfg.get(flag):
                raise SAELoadError(f"{cfg_path}: {flag}=true is not supported (plain TopK SAEs only)")
        if cfg.get("activation", "topk") != "topk":
            raise SAELoadError(
                f"{cfg_path}: activation {cfg['activation']!r} is not supported; expected 'topk'"
            )
        k = positive_int(cfg_path, "k", cfg.get("k"))
        check_d_in(cfg_path, cfg.get("d_in"), d_model)  # absent in some files: weights decide

        shapes = safetensors_shapes(path)
        if "W_skip" in shapes:
            raise SAELoadError(f"{path}: has W_skip (skip connection), which is not supported")
        layout: dict[str, tuple[str, ...]] = {
            "encoder.weight": ("d_sae", "d_model"),
            "W_dec": ("d_sae", "d_model"),
            "encoder.bias": ("d_sae",),
            "b_dec": ("d_model",),
        }
        require_keys(path, shapes.keys(), tuple(layout))
        d_sae = check_shapes(path, {n: shapes[n] for n in layout}, layout, d_model)
        check_d_sae(path, cfg_path, "num_latents", cfg.get("num_latents"), d_sae)
        check_k(cfg_path, k, d_sae)
        sd = safetensors_load(path, list(layout))
        return SAEWeights(
            layer=layer,
            W_enc=convert(sd["encoder.weight"], dtype, device),
            b_enc=convert(sd["encoder.bias"], dtype, device),
            W_dec=convert(sd["W_dec"], dtype, device),
            b_dec=convert(sd["b_dec"], dtype, device),
            activation="topk",
            k=k,
            threshold=None,
            apply_b_dec_to_input=True,  # sparsify encodes (x - b_dec)
            architecture="sparsify/topk",
            source=str(path),
            hook_point="resid_post",
        )
