"""Reading a direction vector out of an uploaded file, without ever running its contents.

Formats are told apart by their first bytes, not by the file name: `.npy` (numpy, read with
allow_pickle=False), `.safetensors`, `.pt` (a tensor, read by torch.load(weights_only=True), which
refuses anything but tensors and plain containers) and GGUF control vectors as repeng's
`export_gguf` and llama.cpp's `cvector-generator` write them: architecture `controlvector`, one
F32 tensor `direction.{N}` per layer, where N is the decoder block whose output it steers (llama.cpp
adds `direction.N` after block N, counted from 0, which is steerserve's layer N).
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from typing import Any

import numpy as np

from steerserve.errors import APIError

ANY_LAYER = None  # a vector stored without a layer steers any layer it is named at
GGUF_DIRECTION = re.compile(r"direction\.([0-9]{1,4})")


def _bad(message: str, param: str = "file") -> APIError:
    return APIError(message, param=param, code="invalid_vector_file")


def _single(tensors: dict[str, Any], tensor: str | None, kind: str) -> Any:
    """The tensor named `tensor`, or the file's only one."""
    if tensor is not None:
        if tensor not in tensors:
            raise _bad(f"the {kind} file has no tensor {tensor!r} (it has {sorted(tensors)[:20]})", "tensor")
        return tensors[tensor]
    if len(tensors) != 1:
        raise _bad(f"the {kind} file holds {len(tensors)} tensors {sorted(tensors)[:20]}; name one with `tensor`",
                   "tensor")
    return next(iter(tensors.values()))


def _torch_tensors(data: bytes, kind: str) -> dict[str, Any]:
    import torch  # the server runs beside vLLM, which brings torch
    from safetensors.torch import load as load_safetensors

    try:
        if kind == "safetensors":
            return load_safetensors(data)
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects with an UnpicklingError
        raise _bad(f"not a readable {kind} file of tensors ({str(exc).splitlines()[0][:300]})") from None
    if isinstance(loaded, torch.Tensor):
        return {"tensor": loaded}
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return {str(k): v for k, v in loaded.items()}
    raise _bad("a .pt file must hold one tensor or a dict of tensors")


def _as_float32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bf16 included)
        value = value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise _bad(f"a vector must hold floating-point values, not {array.dtype}")
    array = np.squeeze(array)
    if array.ndim != 1:
        raise _bad(f"a vector must be one-dimensional (d_model values), not of shape {list(np.shape(value))}")
    return array.astype(np.float32)


def _npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise _bad(f"not a readable .npy array of numbers ({str(exc)[:300]})") from None


def _gguf(data: bytes) -> dict[int | None, np.ndarray]:
    from gguf import GGUFReader  # reads from a path (it memory-maps the file)

    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as tmp:
        tmp.write(data)
    try:
        try:
            reader = GGUFReader(tmp.name)
        except Exception as exc:
            raise _bad(f"not a readable GGUF file ({str(exc)[:300]})") from None
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
        if arch != "controlvector":
            raise _bad(f"a GGUF upload must be a control vector (general.architecture 'controlvector'), not {arch!r}")
        layers: dict[int | None, np.ndarray] = {}
        for tensor in reader.tensors:
            match = GGUF_DIRECTION.fullmatch(tensor.name)
            if match is None:
                raise _bad(f"unexpected tensor {tensor.name!r} in a control vector (expected direction.N)")
            if tensor.tensor_type.name not in ("F32", "F16"):
                raise _bad(f"tensor {tensor.name} is {tensor.tensor_type.name}; control vectors are F32 or F16")
            layers[int(match.group(1))] = _as_float32(np.array(tensor.data))
        if not layers:
            raise _bad("the control vector holds no direction.N tensors")
        return layers
    finally:
        os.unlink(tmp.name)


def read_vector_file(data: bytes, tensor: str | None = None) -> dict[int | None, np.ndarray]:
    """layer -> vector (ANY_LAYER for a file without layers); `tensor` names one tensor of a
    .safetensors or .pt file that holds several."""
    if data.startswith(b"GGUF"):
        if tensor is not None:
            raise _bad("a GGUF control vector holds one tensor per layer: `tensor` does not apply", "tensor")
        return _gguf(data)
    if data.startswith(b"\x93NUMPY"):
        return {ANY_LAYER: _as_float32(_npy(data))}
    if data.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        return {ANY_LAYER: _as_float32(_single(_torch_tensors(data, "pt"), tensor, ".pt"))}
    if len(data) > 8 and data[8:9] == b"{":  # safetensors: a u64 header length, then its JSON header
        return {ANY_LAYER: _as_float32(_single(_torch_tensors(data, "safetensors"), tensor, ".safetensors"))}
    raise _bad("unrecognised file: upload a .safetensors, .pt or .npy vector, or a GGUF control vector")
