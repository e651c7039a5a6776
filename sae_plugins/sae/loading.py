"""Find and load per-layer SAEs from disk, whatever format they were published in.

Three layouts are recognised and all become one `SAEWeights` (feature i = row i of W_dec):

- Qwen-Scope: `layer{n}.sae.pt` files. The release has no config: its TopK k and width are in
  the repo name `SAE-Res-{model}-W{N}K-L0_{K}` (d_sae = N x 1024, k = K), as SAELens' own
  `qwen_scope` loader reads them. A `config.json` (model_type topk_sae) beside the files, as this
  project writes for its own SAEs, or `--sae-k` give k too; every source given must agree.
- SAELens: `cfg.json` + `sae_weights.safetensors`, either in the directory itself (one layer)
  or in one subdirectory per layer.
- EleutherAI sparsify: one subdirectory per hookpoint (`layers.8/`), each with `cfg.json` +
  `sae.safetensors`.

Only SAEs on the residual stream after a decoder layer (resid_post) are accepted: that is the
one place the server steers, and an SAE trained elsewhere would be applied at the wrong spot
without any error. Every failure is a `SAELoadError` naming the file and what was expected,
because these files are large, hand-assembled, and the first symptom is otherwise a shape
error deep inside a CUDA kernel.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from steerserve_sae.sae.autoencoder import ActivationKind, SAEWeights

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

QWEN_SCOPE, SAELENS, SPARSIFY = "qwen-scope", "saelens", "sparsify"
_QWEN_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
_QWEN_NAME = re.compile(r"SAE-Res-(?P<model>.+)-W(?P<width>\d+)K-L0_(?P<k>\d+)")
_SPARSIFY_HOOK = re.compile(r"(?:^|\.)(\d+)$")  # "layers.8", "model.layers.8"
_SAELENS_HOOK = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.(hook_[a-z_]+))?$")
_SAELENS_ACTIVATION: dict[str, ActivationKind] = {
    "standard": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
}
_NOT_RESID_POST = "is not resid_post; only residual-stream SAEs after a decoder layer are supported"
_KNOWN_LAYOUTS = (
    "Qwen-Scope (layer{n}.sae.pt files), "
    "SAELens (cfg.json + sae_weights.safetensors, in the directory or in one subdirectory "
    "per layer), EleutherAI sparsify (one subdirectory per hookpoint such as layers.8/, "
    "each with cfg.json + sae.safetensors)"
)


class SAELoadError(ValueError):
    """An SAE file or directory is missing, unsupported or inconsistent with the model."""


@dataclass(frozen=True)
class QwenScopeName:
    """What a Qwen-Scope repo name says: `SAE-Res-Qwen3.5-27B-W80K-L0_50` -> 81920 features, k 50."""

    model: str
    d_sae: int
    k: int


# --------------------------------------------------------------------------- public API


def describe_format(sae_dir: str | Path) -> str:
    """Which layout `sae_dir` is in: "qwen-scope", "saelens" or "sparsify"."""
    return _detect(_as_dir(sae_dir))


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
        raise SAELoadError(_missing_layer_message(root, fmt, layer, layers, ignored))
    path = layers[layer]
    if fmt == QWEN_SCOPE:
        return _load_qwen_scope(root, path, layer, d_model, dtype, device, name, k)
    _refuse_k_option(root, fmt, k)
    if fmt == SAELENS:
        return _load_saelens(path, layer, d_model, dtype, device)
    return _load_sparsify(path, layer, d_model, dtype, device)


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
    m = _QWEN_NAME.fullmatch(name.rsplit("/", 1)[-1])
    if m is None:
        return None
    return QwenScopeName(m["model"], int(m["width"]) * 1024, int(m["k"]))


def qwen_scope_k(sae_dir: str | Path, *, name: str | None = None, k: int | None = None) -> int | None:
    """The TopK k of the Qwen-Scope SAEs in `sae_dir`; None for the other formats, whose
    cfg.json give each SAE's own k (and then `k` must be None).

    Three sources, any one suffices and all given must agree: the name (`name`, default
    `sae_name_of(sae_dir)`) when it is `SAE-Res-{model}-W{N}K-L0_{K}`, `config.json`'s k, and
    `k` (--sae-k, for renamed directories). None given, or two that differ, is an error.
    """
    root = _as_dir(sae_dir)
    fmt = _detect(root)
    if fmt != QWEN_SCOPE:
        _refuse_k_option(root, fmt, k)
        return None
    return _qwen_scope_k(root, _qwen_scope_config(root), name or sae_name_of(root), k)[0]


# --------------------------------------------------------------------------- layout


def _as_dir(sae_dir: str | Path) -> Path:
    root = Path(sae_dir)
    if not root.is_dir():
        raise SAELoadError(f"{root}: SAE directory does not exist or is not a directory")
    return root


def _is_qwen_scope(d: Path) -> bool:
    if any(_QWEN_FILE.match(p.name) for p in d.iterdir()):
        return True
    cfg = d / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "topk_sae"
    except (ValueError, AttributeError):
        return False


def _is_saelens(d: Path) -> bool:
    return (d / "cfg.json").is_file() and (d / "sae_weights.safetensors").is_file()


def _is_sparsify(d: Path) -> bool:
    return (d / "cfg.json").is_file() and (d / "sae.safetensors").is_file()


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir())


def _detect(d: Path) -> str:
    if _is_qwen_scope(d):
        return QWEN_SCOPE
    if _is_saelens(d):
        return SAELENS
    if _is_sparsify(d):
        return SPARSIFY
    subs = _subdirs(d)
    has_saelens = any(_is_saelens(s) for s in subs)
    has_sparsify = any(_is_sparsify(s) for s in subs)
    if has_saelens and has_sparsify:
        raise SAELoadError(
            f"{d}: subdirectories mix SAELens (sae_weights.safetensors) and sparsify "
            "(sae.safetensors) SAEs; put one format per directory"
        )
    if has_saelens:
        return SAELENS
    if has_sparsify:
        return SPARSIFY
    raise SAELoadError(f"{d}: not a recognised SAE directory; expected one of: {_KNOWN_LAYOUTS}")


def _discover(root: Path, fmt: str) -> tuple[dict[int, Path], list[str]]:
    """Layers found, plus "name (reason)" for SAEs present but skipped as unusable."""
    found: dict[int, Path] = {}
    ignored: list[str] = []

    def add(layer: int, path: Path) -> None:
        if layer in found:
            raise SAELoadError(f"{root}: two SAEs for layer {layer}: {found[layer]} and {path}")
        found[layer] = path

    if fmt == QWEN_SCOPE:
        for p in root.iterdir():
            if m := _QWEN_FILE.match(p.name):
                add(int(m.group(1)), p)
    elif fmt == SAELENS:
        single = _is_saelens(root)
        for d in [root] if single else [s for s in _subdirs(root) if _is_saelens(s)]:
            layer, problem = _saelens_layer(_saelens_cfg(d / "cfg.json"))
            if problem is not None:
                if single:
                    raise SAELoadError(f"{d / 'cfg.json'}: {problem}")
                ignored.append(f"{d.name} ({problem})")
            else:
                assert layer is not None
                add(layer, d)
    else:
        single = _is_sparsify(root)
        for d in [root] if single else [s for s in _subdirs(root) if _is_sparsify(s)]:
            m = _SPARSIFY_HOOK.search(d.name)
            if m is None:
                problem = "hookpoint is not a decoder layer's output, e.g. layers.8"
                if single:
                    raise SAELoadError(f"{d}: {problem}")
                ignored.append(f"{d.name} ({problem})")
            else:
                add(int(m.group(1)), d)
    if not found and ignored:
        raise SAELoadError(f"{root}: no usable residual-stream SAE; skipped: {', '.join(ignored)}")
    return dict(sorted(found.items())), ignored


def _missing_layer_message(
    root: Path, fmt: str, layer: int, layers: dict[int, Path], ignored: list[str]
) -> str:
    looked = {
        QWEN_SCOPE: str(root / f"layer{layer}.sae.pt"),
        SAELENS: f"a subdirectory of {root} whose cfg.json hook is blocks.{layer}.hook_resid_post",
        SPARSIFY: str(root / f"layers.{layer}"),
    }[fmt]
    have = ", ".join(map(str, layers)) or "none"
    msg = f"{root} ({fmt}): no SAE for layer {layer}; looked for {looked}; layers present: {have}"
    return msg + (f"; skipped: {', '.join(ignored)}" if ignored else "")


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAELoadError(f"{path}: file not found; expected the SAE's JSON config") from None
    except ValueError as e:
        raise SAELoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SAELoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _positive_int(src: Path | str, key: str, value: Any) -> int:
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or value <= 0:
        raise SAELoadError(f"{src}: {key} is {value!r}; expected a positive integer")
    return int(value)


def _require_keys(src: Path, keys: Any, required: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in keys]
    if missing:
        raise SAELoadError(
            f"{src}: missing tensor(s) {', '.join(missing)}; expected {', '.join(required)} "
            f"(found: {', '.join(sorted(keys)) or 'none'})"
        )


def _check_shapes(
    src: Path,
    shapes: dict[str, tuple[int, ...]],
    layout: dict[str, tuple[str, ...]],
    d_model: int,
) -> int:
    """Check every tensor against its named dims; returns d_sae.

    The first entry of `layout` is the anchor: its d_model dim is checked against the model
    and its d_sae dim fixes d_sae for the rest, so the message can say which one is wrong.
    """
    anchor, anchor_dims = next(iter(layout.items()))
    got = shapes[anchor]
    if len(got) != len(anchor_dims) or got[anchor_dims.index("d_model")] != d_model:
        want = ", ".join(str(d_model) if n == "d_model" else n for n in anchor_dims)
        want += "," if len(anchor_dims) == 1 else ""
        raise SAELoadError(
            f"{src}: {anchor} has shape {got} but the model's hidden size is {d_model}; "
            f"expected ({want})"
        )
    dims = {"d_model": d_model}
    if "d_sae" in anchor_dims:
        dims["d_sae"] = got[anchor_dims.index("d_sae")]
    for name, names in layout.items():
        want_shape = tuple(dims[n] for n in names)
        if shapes[name] != want_shape:
            raise SAELoadError(
                f"{src}: {name} has shape {shapes[name]}; expected {want_shape} "
                f"({', '.join(names)}) with d_model={d_model} (the model's hidden size) "
                f"and d_sae={dims['d_sae']} (from {anchor} {got})"
            )
    return dims["d_sae"]


def _check_d_sae(src: Path, cfg_path: Path, key: str, declared: Any, d_sae: int) -> None:
    if declared is not None and declared != 0 and declared != d_sae:
        raise SAELoadError(
            f"{src}: weights have {d_sae} features but {cfg_path} says {key}={declared}"
        )


def _check_d_in(cfg_path: Path, d_in: Any, d_model: int) -> None:
    if d_in is not None and d_in != d_model:
        raise SAELoadError(f"{cfg_path}: d_in is {d_in} but the model's hidden size is {d_model}")


def _check_k(cfg_path: Path, k: int, d_sae: int) -> None:
    if k > d_sae:
        raise SAELoadError(f"{cfg_path}: k={k} is larger than the SAE's {d_sae} features")


def _convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    # Cast and move first, then make contiguous, so a transposed view is re-laid out on the
    # target device (fast on GPU) instead of materialising an fp32 copy on the host first.
    out = t.to(device=device, dtype=dtype).contiguous()
    if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        # Still the file's memory map (fp32 on CPU): copy, or replacing the file on disk
        # while the server runs would change the weights or kill the process with SIGBUS.
        out = out.clone()
    return out


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the header only, so bad files fail before a GB is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types
        raise SAELoadError(f"{path}: cannot read as safetensors ({e})") from None


def _safetensors_load(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:
        raise SAELoadError(f"{path}: cannot read as safetensors ({e})") from None


# --------------------------------------------------------------------------- Qwen-Scope


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


def _refuse_k_option(root: Path, fmt: str, k: int | None) -> None:
    if k is not None:
        raise SAELoadError(
            f"{root} ({fmt}): --sae-k applies only to Qwen-Scope layer{{n}}.sae.pt files; "
            "this format's cfg.json gives each SAE's k"
        )


def _qwen_scope_config(root: Path) -> dict[str, Any] | None:
    """config.json beside the layer files, checked; None when there is none (as released)."""
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = _read_json(cfg_path)
    if cfg.get("model_type") != "topk_sae":
        raise SAELoadError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}; expected 'topk_sae'"
        )
    hook = cfg.get("hook_point", "resid_post")
    if hook != "resid_post":
        raise SAELoadError(f"{cfg_path}: hook_point is {hook!r}; only 'resid_post' is supported")
    return cfg


def _qwen_scope_k(
    root: Path, cfg: dict[str, Any] | None, name: str, k: int | None
) -> tuple[int, str]:
    """Where k comes from (see `qwen_scope_k`): (k, the sources that gave it), all of which
    must agree."""
    given: list[tuple[str, int]] = []
    if (named := parse_qwen_scope_name(name)) is not None:
        given.append((f"the name {name!r}", named.k))
    cfg_path = root / "config.json"
    if cfg is not None and "k" in cfg:
        given.append((str(cfg_path), _positive_int(cfg_path, "k", cfg["k"])))
    if k is not None:
        given.append(("--sae-k", _positive_int("--sae-k", "k", k)))
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


def _load_qwen_scope(
    root: Path,
    path: Path,
    layer: int,
    d_model: int,
    dtype: torch.dtype,
    device: torch.device | str,
    name: str | None,
    k_option: int | None,
) -> SAEWeights:
    cfg_path = root / "config.json"
    cfg = _qwen_scope_config(root)
    name = name or sae_name_of(root)
    k, k_source = _qwen_scope_k(root, cfg, name, k_option)
    if cfg is not None and "d_model" in cfg and cfg["d_model"] != d_model:
        raise SAELoadError(
            f"{cfg_path}: d_model is {cfg['d_model']} but the model's hidden size is {d_model}"
        )
    sd = _torch_load(path)
    if not isinstance(sd, dict):
        raise SAELoadError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    required = ("W_enc", "W_dec", "b_enc", "b_dec")
    _require_keys(path, sd.keys(), required)
    shapes = {n: tuple(sd[n].shape) for n in required}
    d_sae = _check_shapes(
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
        _check_d_sae(path, cfg_path, "d_sae", cfg.get("d_sae"), d_sae)
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
        W_enc=_convert(sd["W_enc"], dtype, device),
        b_enc=_convert(sd["b_enc"], dtype, device),
        W_dec=_convert(sd["W_dec"].t(), dtype, device),  # column i -> row i
        b_dec=_convert(sd["b_dec"], dtype, device),
        activation="topk",
        k=k,
        threshold=None,
        apply_b_dec_to_input=False,
        architecture="qwen-scope/topk",
        source=str(path),
        hook_point="resid_post",
    )


# --------------------------------------------------------------------------- SAELens


def _saelens_cfg(path: Path) -> dict[str, Any]:
    """cfg.json flattened: SAELens >= 6 nests hook_name etc. under `metadata` (once `meta`)."""
    raw = _read_json(path)
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


def _saelens_layer(cfg: dict[str, Any]) -> tuple[int | None, str | None]:
    """(layer, None) for a resid_post hook, else (None, why it cannot be used)."""
    hook = cfg.get("hook_name")
    if isinstance(hook, str) and (m := _SAELENS_HOOK.search(hook)):
        if m.group(2) not in (None, "hook_resid_post"):
            return None, f"hook {hook!r} {_NOT_RESID_POST}"
        return int(m.group(1)), None
    if hook is not None and not (isinstance(hook, str) and hook.endswith("hook_resid_post")):
        return None, f"hook {hook!r} {_NOT_RESID_POST}"
    layer = cfg.get("hook_layer")
    if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
        return layer, None
    return None, "no layer: expected hook_name like 'blocks.8.hook_resid_post' or hook_layer"


def _load_saelens(
    d: Path, layer: int, d_model: int, dtype: torch.dtype, device: torch.device | str
) -> SAEWeights:
    cfg_path, path = d / "cfg.json", d / "sae_weights.safetensors"
    cfg = _saelens_cfg(cfg_path)
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
    _check_d_in(cfg_path, cfg.get("d_in"), d_model)
    k: int | None = None
    if arch == "topk":
        raw_k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if raw_k is None:
            raise SAELoadError(
                f"{cfg_path}: topk SAE without k; expected 'k' or activation_fn_kwargs.k"
            )
        k = _positive_int(cfg_path, "k", raw_k)

    shapes = _safetensors_shapes(path)
    required = ["W_enc", "W_dec", "b_enc", "b_dec"]
    thr_key = None
    if arch == "jumprelu":
        # Inference files store `threshold`; some training checkpoints only `log_threshold`.
        old_style = "threshold" not in shapes and "log_threshold" in shapes
        thr_key = "log_threshold" if old_style else "threshold"
        required.append(thr_key)
    _require_keys(path, shapes.keys(), tuple(required))
    layout: dict[str, tuple[str, ...]] = {
        "W_enc": ("d_model", "d_sae"),
        "W_dec": ("d_sae", "d_model"),
        "b_enc": ("d_sae",),
        "b_dec": ("d_model",),
    }
    if thr_key:
        layout[thr_key] = ("d_sae",)
    d_sae = _check_shapes(path, {n: shapes[n] for n in layout}, layout, d_model)
    _check_d_sae(path, cfg_path, "d_sae", cfg.get("d_sae"), d_sae)
    if k is not None:
        _check_k(cfg_path, k, d_sae)
    extra = ["scaling_factor"] if "scaling_factor" in shapes else []
    sd = _safetensors_load(path, list(layout) + extra)
    if "scaling_factor" in sd and not torch.all(sd["scaling_factor"] == 1):
        raise SAELoadError(
            f"{path}: scaling_factor other than 1 (finetuning_scaling_factor) is not supported"
        )

    threshold = None
    if thr_key:
        t = sd[thr_key]
        threshold = _convert(t.exp() if thr_key == "log_threshold" else t, dtype, device)
    return SAEWeights(
        layer=layer,
        W_enc=_convert(sd["W_enc"].t(), dtype, device),  # [d_in, d_sae] -> row i = feature i
        b_enc=_convert(sd["b_enc"], dtype, device),
        W_dec=_convert(sd["W_dec"], dtype, device),
        b_dec=_convert(sd["b_dec"], dtype, device),
        activation=_SAELENS_ACTIVATION[arch],
        k=k,
        threshold=threshold,
        # SAELens' own default (SAEConfig and pre-6 configs alike) when the key is absent.
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        architecture=f"saelens/{arch}",
        source=str(path),
        hook_point="resid_post",
    )


# --------------------------------------------------------------------------- sparsify


def _load_sparsify(
    d: Path, layer: int, d_model: int, dtype: torch.dtype, device: torch.device | str
) -> SAEWeights:
    cfg_path, path = d / "cfg.json", d / "sae.safetensors"
    cfg = _read_json(cfg_path)
    for flag in ("skip_connection", "transcode", "embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise SAELoadError(f"{cfg_path}: {flag}=true is not supported (plain TopK SAEs only)")
    if cfg.get("activation", "topk") != "topk":
        raise SAELoadError(
            f"{cfg_path}: activation {cfg['activation']!r} is not supported; expected 'topk'"
        )
    k = _positive_int(cfg_path, "k", cfg.get("k"))
    _check_d_in(cfg_path, cfg.get("d_in"), d_model)  # absent in some files: weights decide

    shapes = _safetensors_shapes(path)
    if "W_skip" in shapes:
        raise SAELoadError(f"{path}: has W_skip (skip connection), which is not supported")
    layout: dict[str, tuple[str, ...]] = {
        "encoder.weight": ("d_sae", "d_model"),
        "W_dec": ("d_sae", "d_model"),
        "encoder.bias": ("d_sae",),
        "b_dec": ("d_model",),
    }
    _require_keys(path, shapes.keys(), tuple(layout))
    d_sae = _check_shapes(path, {n: shapes[n] for n in layout}, layout, d_model)
    _check_d_sae(path, cfg_path, "num_latents", cfg.get("num_latents"), d_sae)
    _check_k(cfg_path, k, d_sae)
    sd = _safetensors_load(path, list(layout))
    return SAEWeights(
        layer=layer,
        W_enc=_convert(sd["encoder.weight"], dtype, device),
        b_enc=_convert(sd["encoder.bias"], dtype, device),
        W_dec=_convert(sd["W_dec"], dtype, device),
        b_dec=_convert(sd["b_dec"], dtype, device),
        activation="topk",
        k=k,
        threshold=None,
        apply_b_dec_to_input=True,  # sparsify encodes (x - b_dec)
        architecture="sparsify/topk",
        source=str(path),
        hook_point="resid_post",
    )
