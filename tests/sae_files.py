"""Writers of small synthetic SAE sets in each published on-disk format.

No SAE can be downloaded in tests, so these reproduce the exact layouts (file names, tensor
names, tensor orientation, config keys) of Qwen-Scope, SAELens and EleutherAI sparsify.
Each writer returns the tensors it wrote, per layer and in FILE orientation, so a test can
check that the loader transposed exactly what it had to and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def write_qwen_scope(
    root: Path,
    layers: tuple[int, ...] = (0, 3),
    *,
    d_model: int = 16,
    d_sae: int = 64,
    k: int = 8,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> dict[int, Tensors]:
    """`config.json` + `layer{n}.sae.pt` (dict of fp32 tensors, W_dec is (d_model, d_sae))."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": "topk_sae",
        "base_model": "Qwen/Qwen3.5-27B",
        "d_model": d_model,
        "d_sae": d_sae,
        "k": k,
        "num_layers": max(layers, default=-1) + 1,
        "hook_point": "resid_post",
        "dtype": "float32",
        **(config or {}),
    }
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, Tensors] = {}
    for layer in layers:
        sd = {
            "W_enc": _rand(gen, d_sae, d_model),
            "W_dec": _rand(gen, d_model, d_sae),
            "b_enc": _rand(gen, d_sae),
            "b_dec": _rand(gen, d_model),
        }
        torch.save(sd, root / f"layer{layer}.sae.pt")
        out[layer] = sd
    return out


def saelens_cfg(
    layer: int,
    *,
    d_model: int,
    d_sae: int,
    architecture: str = "jumprelu",
    k: int | None = None,
    style: str = "v6",
) -> dict[str, Any]:
    """A cfg.json as SAELens writes it: v6 nests hook info under `metadata`; legacy is flat."""
    hook = f"blocks.{layer}.hook_resid_post"
    if style == "v6":
        cfg: dict[str, Any] = {
            "d_in": d_model,
            "d_sae": d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": "6.12.1",
                "sae_lens_training_version": "6.12.1",
                "model_name": "Qwen/Qwen3.5-2B",
                "hook_name": hook,
                "hook_head_index": None,
                "prepend_bos": False,
                "dataset_path": "synthetic",
                "context_size": 1024,
            },
            "architecture": architecture,
        }
        if architecture == "topk":
            cfg["k"] = k
            cfg["rescale_acts_by_decoder_norm"] = False
        return cfg
    cfg = {  # pre-6.0 layout
        "architecture": architecture,
        "d_in": d_model,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cuda",
        "model_name": "Qwen/Qwen3.5-2B",
        "hook_name": hook,
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "3.20.0",
        "prepend_bos": True,
        "dataset_path": "synthetic",
        "context_size": 128,
        "normalize_activations": "none",
    }
    if architecture == "topk":
        cfg["architecture"] = "standard"  # old SAELens: topk as standard + activation_fn topk
        cfg["activation_fn_str"] = "topk"
        cfg["activation_fn_kwargs"] = {"k": k}
    return cfg


def write_saelens_one(
    sae_dir: Path,
    layer: int,
    *,
    d_model: int = 16,
    d_sae: int = 64,
    architecture: str = "jumprelu",
    k: int | None = 8,
    style: str = "v6",
    seed: int = 0,
    cfg_updates: dict[str, Any] | None = None,
) -> Tensors:
    """One SAELens SAE: `cfg.json` + `sae_weights.safetensors` (W_enc is [d_in, d_sae])."""
    sae_dir.mkdir(parents=True, exist_ok=True)
    cfg = saelens_cfg(
        layer, d_model=d_model, d_sae=d_sae, architecture=architecture, k=k, style=style
    )
    cfg.update(cfg_updates or {})
    (sae_dir / "cfg.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed + layer)
    sd = {
        "W_enc": _rand(gen, d_model, d_sae),
        "W_dec": _rand(gen, d_sae, d_model),
        "b_enc": _rand(gen, d_sae),
        "b_dec": _rand(gen, d_model),
    }
    if architecture == "jumprelu":
        sd["threshold"] = _rand(gen, d_sae).abs()
    save_file(sd, str(sae_dir / "sae_weights.safetensors"))
    return sd


def write_saelens(
    root: Path, layers: tuple[int, ...] = (2, 5), **kwargs: Any
) -> dict[int, Tensors]:
    """One SAELens subdirectory per layer, named like releases do: `blocks.N.hook_resid_post`."""
    return {
        layer: write_saelens_one(root / f"blocks.{layer}.hook_resid_post", layer, **kwargs)
        for layer in layers
    }


def write_sparsify(
    root: Path,
    layers: tuple[int, ...] = (1, 4),
    *,
    d_model: int = 16,
    d_sae: int = 64,
    k: int = 8,
    seed: int = 0,
    with_d_in: bool = True,
    cfg_updates: dict[str, Any] | None = None,
    hookpoint: str = "layers.{layer}",
) -> dict[int, Tensors]:
    """sparsify's `save_to_disk` layout: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, Tensors] = {}
    for layer in layers:
        d = root / hookpoint.format(layer=layer)
        d.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "activation": "topk",
            "expansion_factor": d_sae // d_model,
            "normalize_decoder": True,
            "num_latents": d_sae,
            "k": k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
        }
        if with_d_in:
            cfg["d_in"] = d_model
        cfg.update(cfg_updates or {})
        (d / "cfg.json").write_text(json.dumps(cfg))
        sd = {
            "encoder.weight": _rand(gen, d_sae, d_model),
            "encoder.bias": _rand(gen, d_sae),
            "W_dec": _rand(gen, d_sae, d_model),
            "b_dec": _rand(gen, d_model),
        }
        if cfg.get("skip_connection"):
            sd["W_skip"] = _rand(gen, d_model, d_model)
        save_file(sd, str(d / "sae.safetensors"))
        out[layer] = sd
    return out
