"""Writers of small synthetic SAE sets in each published on-disk format.

No SAE can be downloaded in tests, so these reproduce the exact layouts (file names, tensor
names, tensor orientation, config keys) of Qwen-Scope, SAELens and EleutherAI sparsify, and of
the Hugging Face cache a hub download leaves behind. Each SAE writer returns the tensors it
wrote, per layer and in FILE orientation, so a test can check that the loader transposed
exactly what it had to and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
    with_config: bool = True,
) -> dict[int, Tensors]:
    """`layer{n}.sae.pt` (dict of fp32 tensors, W_dec is (d_model, d_sae)), plus the
    `config.json` this project writes for its own SAEs unless `with_config` is False (the
    release has none: k and the width are in the repo name)."""
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
    if with_config:
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


def write_hub_cache(
    cache: Path, repo_id: str, files: dict[str, Path], *, listed: list[str] | None = None
) -> Path:
    """A repo in a Hugging Face cache as huggingface_hub leaves it after downloading `files`
    (repo path -> local source) at main: `models--{owner}--{name}/` with `refs/main` holding
    the commit, the contents under `blobs/` (LFS files named by their sha256, the others by
    their git blob sha1), `snapshots/<commit>/<path>` symlinks to them, and, when `listed` is
    given, the repo's whole file listing in `trees/<commit>.json` (huggingface_hub >= 1.x
    writes it on every online download). Returns the snapshot directory."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr((repo_id, sorted(files))).encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    entries: dict[str, dict[str, Any]] = {}
    for path, src in files.items():
        data = src.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry: dict[str, Any] = {"size": len(data), "blob_id": git_sha1}
        blob = git_sha1
        if path.endswith((".pt", ".safetensors")):  # stored with LFS: the cache names the blob by its sha256
            blob = hashlib.sha256(data).hexdigest()
            entry.update(lfs_sha256=blob, lfs_size=len(data))
        shutil.copyfile(src, folder / "blobs" / blob)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(folder / "blobs" / blob, link.parent))
        entries[path] = entry
    if listed is not None:
        size = max((e["size"] for e in entries.values()), default=1)
        tree = {path: entries.get(path) or {"size": size, "blob_id": hashlib.sha1(path.encode()).hexdigest()}
                for path in listed}
        (folder / "trees").mkdir(exist_ok=True)
        (folder / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return snapshot
