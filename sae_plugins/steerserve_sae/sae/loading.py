"""Find and load per-layer SAEs from disk, whatever format they were published in.

Each format is one class in sae/formats/ (FORMATS, tried in this order); all become one
`SAEWeights` (feature i = row i of W_dec):

- Qwen-Scope: `layer{n}.sae.pt` files, k and width from the repo name (formats/qwen_scope.py).
- SAELens: `cfg.json` + `sae_weights.safetensors`, either in the directory itself (one layer)
  or in one subdirectory per layer (formats/saelens.py).
- EleutherAI sparsify: one subdirectory per hookpoint (`layers.8/`), each with `cfg.json` +
  `sae.safetensors` (formats/sparsify.py).

Only SAEs on the residual stream after a decoder layer (resid_post) are accepted: that is the
one place the server steers, and an SAE trained elsewhere would be applied at the wrong spot
without any error. Every failure is a `SAELoadError` naming the file and what was expected,
because these files are large, hand-assembled, and the first symptom is otherwise a shape
error deep inside a CUDA kernel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.sae.formats.base import LayerDirFormat, SAEFormat, SAELoadError, subdirs
from steerserve_sae.sae.formats.qwen_scope import QwenScope, QwenScopeName, parse_qwen_scope_name, sae_name_of
from steerserve_sae.sae.formats.saelens import SAELens
from steerserve_sae.sae.formats.sparsify import Sparsify

__all__ = [
    "QwenScopeName",
    "SAELoadError",
    "describe_format",
    "discover_sae_layers",
    "load_sae_layer",
    "parse_qwen_scope_name",
    "qwen_scope_k",
    "sae_name_of",
]

FORMATS: tuple[SAEFormat, ...] = (QwenScope(), SAELens(), Sparsify())


def describe_format(sae_dir: str | Path) -> str:
    """Which layout `sae_dir` is in: "qwen-scope", "saelens" or "sparsify"."""
    return _detect(_as_dir(sae_dir)).name


def discover_sae_layers(sae_dir: str | Path) -> dict[int, Path]:
    """Map layer -> the file or directory holding that layer's SAE, sorted by layer."""
    root = _as_dir(sae_dir)
    return _discover(root, _detect(root))[0]


def load_sae_layer(
    sae_dir: str | Path,
    layer: int,
    *,
    d_model: int,
    dtype: torch.dtype,
    device: torch.device | str,
    name: str | None = None,
    k: int | None = None,
) -> SAEWeights:
    """Load one layer's SAE, check it against the model's hidden size, move it to dtype/device.

    `name` and `k` only matter for Qwen-Scope files (see `qwen_scope_k`): the name to read the
    width and k from (default: `sae_name_of(sae_dir)`) and an explicit k (--sae-k).
    """
    root = _as_dir(sae_dir)
    fmt = _detect(root)
    layers, ignored = _discover(root, fmt)
    if layer not in layers:
        have = ", ".join(map(str, layers)) or "none"
        msg = (f"{root} ({fmt.name}): no SAE for layer {layer}; looked for {fmt.looked_for(root, layer)}; "
               f"layers present: {have}")
        raise SAELoadError(msg + (f"; skipped: {', '.join(ignored)}" if ignored else ""))
    return fmt.load(root, layers[layer], layer, d_model, dtype, device, name, k)


def qwen_scope_k(sae_dir: str | Path, *, name: str | None = None, k: int | None = None) -> int | None:
    """The TopK k of the Qwen-Scope SAEs in `sae_dir`; None for the other formats, whose
    cfg.json give each SAE's own k (and then `k` must be None).

    Three sources, any one suffices and all given must agree: the name (`name`, default
    `sae_name_of(sae_dir)`) when it is `SAE-Res-{model}-W{N}K-L0_{K}`, `config.json`'s k, and
    `k` (--sae-k, for renamed directories). None given, or two that differ, is an error.
    """
    root = _as_dir(sae_dir)
    return _detect(root).k(root, name, k)


def _as_dir(sae_dir: str | Path) -> Path:
    root = Path(sae_dir)
    if not root.is_dir():
        raise SAELoadError(f"{root}: SAE directory does not exist or is not a directory")
    return root


def _detect(d: Path) -> SAEFormat:
    for fmt in FORMATS:
        if fmt.holds(d):
            return fmt
    subs = subdirs(d)
    in_subdirs = [fmt for fmt in FORMATS if isinstance(fmt, LayerDirFormat) and any(fmt.holds(s) for s in subs)]
    if len(in_subdirs) > 1:
        mixed = " and ".join(f"{fmt.label} ({fmt.weights})" for fmt in in_subdirs)
        raise SAELoadError(f"{d}: subdirectories mix {mixed} SAEs; put one format per directory")
    if in_subdirs:
        return in_subdirs[0]
    known = ", ".join(fmt.layout for fmt in FORMATS)
    raise SAELoadError(f"{d}: not a recognised SAE directory; expected one of: {known}")


def _discover(root: Path, fmt: SAEFormat) -> tuple[dict[int, Path], list[str]]:
    """Layers found, plus "name (reason)" for SAEs present but skipped as unusable."""
    found: dict[int, Path] = {}
    layers, ignored = fmt.find_layers(root)
    for layer, path in layers:
        if layer in found:
            raise SAELoadError(f"{root}: two SAEs for layer {layer}: {found[layer]} and {path}")
        found[layer] = path
    if not found and ignored:
        raise SAELoadError(f"{root}: no usable residual-stream SAE; skipped: {', '.join(ignored)}")
    return dict(sorted(found.items())), ignored
