"""Qwen-Scope: `layer{n}.sae.pt` files (TopK SAEs, W_dec stored [d_model, d_sae]).

The release has no config: its TopK k and width are in the repo name `SAE-Res-{model}-W{N}K-L0_{K}`
(d_sae = N x 1024, k = K), as SAELens' own `qwen_scope` loader reads them. A `config.json`
(model_type topk_sae) beside the files, as this project writes for its own SAEs, or `--sae-k`
give k too; every source given must agree.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.sae.formats.base import SAEFormat, SAELoadError
from steerserve_sae.sae.formats.checks import check_d_sae, check_shapes, convert, positive_int, read_json, \
    require_keys

_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
_NAME = re.compile(r"SAE-Res-(?P<model>.+)-W(?P<width>\d+)K-L0_(?P<k>\d+)")


@dataclass(frozen=True)
class QwenScopeName:
    """What a Qwen-Scope repo name says: `SAE-Res-Qwen3.5-27B-W80K-L0_50` -> 81920 features, k 50."""

    model: str
    d_sae: int
    k: int


def sae_name_of(sae_dir: str | Path) -> str:
    """The name a directory's Qwen-Scope width and k are read from: its own name, or for a
    snapshot in the Hugging Face cache (`models--Qwen--SAE-Res-...-L0_50/snapshots/<sha>`) the
    repo's name."""
    root = Path(os.path.abspath(sae_dir))
    repo_dir = root.parent.parent.name
    if root.parent.name == "snapshots" and repo_dir.startswith("models--"):
        return repo_dir.split("--")[-1]  # hub repo ids cannot contain "--"
    return root.name


def parse_qwen_scope_name(name: str) -> QwenScopeName | None:
    """Width and k from a Qwen-Scope repo or directory name (the part after the last "/"), or
    None when it does not follow `SAE-Res-{model}-W{N}K-L0_{K}` exactly."""
    m = _NAME.fullmatch(name.rsplit("/", 1)[-1])
    if m is None:
        return None
    return QwenScopeName(m["model"], int(m["width"]) * 1024, int(m["k"]))


def trained_on(sae_name: str | None, repo_id: str | None = None) -> str | None:
    """The model a Qwen-Scope set was trained on, from its name: `Qwen/Qwen3.5-9B-Base` for the
    hub repo `Qwen/SAE-Res-Qwen3.5-9B-Base-W64K-L0_50` (the release keeps models and SAEs under
    one owner), `Qwen3.5-9B-Base` for a directory of that name; None for other names."""
    parsed = parse_qwen_scope_name(sae_name) if sae_name else None
    if parsed is None:
        return None
    owner = repo_id.split("/")[0] if repo_id and "/" in repo_id else None
    return f"{owner}/{parsed.model}" if owner else parsed.model


class QwenScope(SAEFormat):
    name = "qwen-scope"
    layout = "Qwen-Scope (layer{n}.sae.pt files)"

    def holds(self, d: Path) -> bool:
        if any(_FILE.match(p.name) for p in d.iterdir()):
            return True
        cfg = d / "config.json"
        if not cfg.is_file():
            return False
        try:
            return json.loads(cfg.read_text()).get("model_type") == "topk_sae"
        except (ValueError, AttributeError):
            return False

    def find_layers(self, root: Path) -> tuple[list[tuple[int, Path]], list[str]]:
        return [(int(m.group(1)), p) for p in root.iterdir() if (m := _FILE.match(p.name))], []

    def looked_for(self, root: Path, layer: int) -> str:
        return str(root / f"layer{layer}.sae.pt")

    def k(self, root: Path, name: str | None, k: int | None) -> int:
        """Three sources, any one suffices and all given must agree: the name (`name`, default
        `sae_name_of(root)`) when it is `SAE-Res-{model}-W{N}K-L0_{K}`, `config.json`'s k, and
        `k` (--sae-k, for renamed directories). None given, or two that differ, is an error."""
        return _k(root, _config(root), name or sae_name_of(root), k)[0]

    def load(self, root: Path, path: Path, layer: int, d_model: int, dtype: torch.dtype,
             device: torch.device | str, name: str | None, k: int | None) -> SAEWeights:
        cfg_path = root / "config.json"
        cfg = _config(root)
        name = name or sae_name_of(root)
        k, k_source = _k(root, cfg, name, k)
        if cfg is not None and "d_model" in cfg and cfg["d_model"] != d_model:
            raise SAELoadError(
                f"{cfg_path}: d_model is {cfg['d_model']} but the model's hidden size is {d_model}"
            )
        sd = _torch_load(path)
        if not isinstance(sd, dict):
            raise SAELoadError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
        required = ("W_enc", "W_dec", "b_enc", "b_dec")
        require_keys(path, sd.keys(), required)
        shapes = {n: tuple(sd[n].shape) for n in required}
        d_sae = check_shapes(
            path,
            shapes,
            {
                "W_enc": ("d_sae", "d_model"),
                "W_dec": ("d_model", "d_sae"),
                "b_enc": ("d_sae",),
                "b_dec": ("d_model",),
            },
            d_model,
        )
        if cfg is not None:
            check_d_sae(path, cfg_path, "d_sae", cfg.get("d_sae"), d_sae)
        named = parse_qwen_scope_name(name)
        if named is not None and named.d_sae != d_sae:
            raise SAELoadError(
                f"{path}: weights have {d_sae} features but the name {name!r} says "
                f"W{named.d_sae // 1024}K ({named.d_sae} features)"
            )
        if k > d_sae:
            raise SAELoadError(f"{path}: k={k} ({k_source}) is larger than the SAE's {d_sae} features")
        return SAEWeights(
            layer=layer,
            W_enc=convert(sd["W_enc"], dtype, device),
            b_enc=convert(sd["b_enc"], dtype, device),
            W_dec=convert(sd["W_dec"].t(), dtype, device),  # column i -> row i
            b_dec=convert(sd["b_dec"], dtype, device),
            activation="topk",
            k=k,
            threshold=None,
            apply_b_dec_to_input=False,
            architecture="qwen-scope/topk",
            source=str(path),
            hook_point="resid_post",
        )


def _torch_load(path: Path) -> Any:
    # mmap: a 27B layer is 3.4 GB of fp32 and is read once, straight into the converted copy.
    # Files written with torch's legacy (non-zip) serialisation cannot be mmapped: retry.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SAELoadError(
                f"{path}: cannot load with torch.load(weights_only=True) ({e})"
            ) from None


def _config(root: Path) -> dict[str, Any] | None:
    """config.json beside the layer files, checked; None when there is none (as released)."""
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != "topk_sae":
        raise SAELoadError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}; expected 'topk_sae'"
        )
    hook = cfg.get("hook_point", "resid_post")
    if hook != "resid_post":
        raise SAELoadError(f"{cfg_path}: hook_point is {hook!r}; only 'resid_post' is supported")
    return cfg


def _k(root: Path, cfg: dict[str, Any] | None, name: str, k: int | None) -> tuple[int, str]:
    """Where k comes from (see QwenScope.k): (k, the sources that gave it), all of which must agree."""
    given: list[tuple[str, int]] = []
    if (named := parse_qwen_scope_name(name)) is not None:
        given.append((f"the name {name!r}", named.k))
    cfg_path = root / "config.json"
    if cfg is not None and "k" in cfg:
        given.append((str(cfg_path), positive_int(cfg_path, "k", cfg["k"])))
    if k is not None:
        given.append(("--sae-k", positive_int("--sae-k", "k", k)))
    if not given:
        raise SAELoadError(
            f"{root}: no k for its Qwen-Scope SAEs (layer{{n}}.sae.pt files hold only tensors); "
            "give it one of three ways: name the directory or hub repo as released, "
            f"SAE-Res-{{model}}-W{{N}}K-L0_{{k}} (this one is named {name!r}); put a config.json "
            'with {"model_type": "topk_sae", "k": K} beside the layer files; or pass --sae-k K'
        )
    if len({value for _, value in given}) > 1:
        said = "; ".join(f"{source} says k={value}" for source, value in given)
        raise SAELoadError(f"{root}: conflicting k for its Qwen-Scope SAEs: {said}; make them agree")
    return given[0][1], " and ".join(source for source, _ in given)
