"""What every format checks and does while loading: JSON configs, tensor names and shapes
against the model's hidden size, reading safetensors headers first, and the final copy onto
the device. Each failure is a SAELoadError naming the file and what was expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from steerserve_sae.sae.formats.base import SAELoadError


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAELoadError(f"{path}: file not found; expected the SAE's JSON config") from None
    except ValueError as e:
        raise SAELoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SAELoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def positive_int(src: Path | str, key: str, value: Any) -> int:
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or value <= 0:
        raise SAELoadError(f"{src}: {key} is {value!r}; expected a positive integer")
    return int(value)


def require_keys(src: Path, keys: Any, required: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in keys]
    if missing:
        raise SAELoadError(
            f"{src}: missing tensor(s) {', '.join(missing)}; expected {', '.join(required)} "
            f"(found: {', '.join(sorted(keys)) or 'none'})"
        )


def check_shapes(
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


def check_d_sae(src: Path, cfg_path: Path, key: str, declared: Any, d_sae: int) -> None:
    if declared is not None and declared != 0 and declared != d_sae:
        raise SAELoadError(
            f"{src}: weights have {d_sae} features but {cfg_path} says {key}={declared}"
        )


def check_d_in(cfg_path: Path, d_in: Any, d_model: int) -> None:
    if d_in is not None and d_in != d_model:
        raise SAELoadError(f"{cfg_path}: d_in is {d_in} but the model's hidden size is {d_model}")


def check_k(cfg_path: Path, k: int, d_sae: int) -> None:
    if k > d_sae:
        raise SAELoadError(f"{cfg_path}: k={k} is larger than the SAE's {d_sae} features")


def convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    # Cast and move first, then make contiguous, so a transposed view is re-laid out on the
    # target device (fast on GPU) instead of materialising an fp32 copy on the host first.
    out = t.to(device=device, dtype=dtype).contiguous()
    if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        # Still the file's memory map (fp32 on CPU): copy, or replacing the file on disk
        # while the server runs would change the weights or kill the process with SIGBUS.
        out = out.clone()
    return out


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the header only, so bad files fail before a GB is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types
        raise SAELoadError(f"{path}: cannot read as safetensors ({e})") from None


def safetensors_load(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:
        raise SAELoadError(f"{path}: cannot read as safetensors ({e})") from None
