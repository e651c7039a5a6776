"""Reading a direction vector out of an uploaded file, without ever running its contents, and
with work bounded by the file's own bytes.

Formats are told apart by their first bytes, not by the file name: `.npy`, `.safetensors`, `.pt`
(a tensor, read by torch.load(weights_only=True), which refuses anything but tensors and plain
containers) and GGUF control vectors as repeng's `export_gguf` and llama.cpp's `cvector-generator`
write them: architecture `controlvector`, one F32 tensor `direction.{N}` per layer, where N is the
decoder block whose output it steers (llama.cpp adds `direction.N` after block N, counted from 0,
which is steerserve's layer N).

Every format declares shapes and lengths before its data, and a hostile file declares whatever
costs most (a GGUF array of 2^40 items in 104 bytes, a zero-stride .pt view of 2^40 values, a
deflated .pt entry of 1,000 times its size). So each declared length is checked against the bytes
that remain, and each tensor's dtype, layout and shape against d_model, before anything is
allocated, decompressed or converted: only the chosen tensor's d_model values are ever copied.
Metadata that must be parsed into objects (a .pt's pickle, a .safetensors JSON header) is capped.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import tempfile
import zipfile
from typing import Any, Sequence

import numpy as np

from steerserve.errors import APIError

ANY_LAYER = None  # a vector stored without a layer steers any layer it is named at
GGUF_DIRECTION = re.compile(r"direction\.([0-9]{1,4})")
MAX_METADATA_BYTES = 1 << 16  # a .pt's pickle, a .safetensors header: parsed objects cost up to ~60x their bytes
MAX_ZIP_ENTRIES = 4096
STORAGE_RECORD = re.compile(r"[^/]+/data/[0-9]+")  # a tensor storage in torch.save's zip (read by mmap)
SAFETENSORS_FLOATS = {"F16": "<f2", "BF16": "bf16", "F32": "<f4", "F64": "<f8"}
GGML_FLOATS = {0: "<f4", 1: "<f2"}  # GGML_TYPE_F32, GGML_TYPE_F16
GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
GGML_MAX_DIMS = 4
MAX_GGUF_VALUES = 1 << 16  # keys and strings read one at a time (a control vector has a handful)
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


def _bad(message: str, param: str = "file") -> APIError:
    return APIError(message, param=param, code="invalid_vector_file")


def _single(entries: dict[str, Any], tensor: str | None, kind: str) -> Any:
    """The entry named `tensor`, or the file's only one."""
    if tensor is not None:
        if tensor not in entries:
            raise _bad(f"the {kind} file has no tensor {tensor!r} (it has {sorted(entries)[:20]})", "tensor")
        return entries[tensor]
    if len(entries) != 1:
        raise _bad(f"the {kind} file holds {len(entries)} tensors {sorted(entries)[:20]}; name one with `tensor`",
                   "tensor")
    return next(iter(entries.values()))


def _check_shape(shape: Sequence[int], d_model: int) -> None:
    """A vector is d_model values along one axis (any other axes of size 1)."""
    if sum(1 for size in shape if size != 1) > 1:
        raise _bad(f"a vector must be one-dimensional (d_model values), not of shape {list(shape[:8])}")
    if math.prod(shape) != d_model:
        raise APIError(f"the vector has {math.prod(shape)} values; the residual stream has {d_model} (d_model)",
                       param="file", code="invalid_vector")


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bf16" else np.dtype(dtype).itemsize


def _floats(data: bytes, dtype: str, count: int, offset: int) -> np.ndarray:
    """`count` little-endian floats of `dtype` at `offset` (bf16: the top half of a float32), as float32."""
    if offset < 0 or len(data) - offset < count * _itemsize(dtype):
        raise _bad("the file ends before the vector's values do")
    if dtype == "bf16":
        halves = np.frombuffer(data, dtype="<u2", count=count, offset=offset)
        return (halves.astype("<u4") << 16).view("<f4").astype(np.float32)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).astype(np.float32)


def _npy(data: bytes, d_model: int) -> np.ndarray:
    from numpy.lib import format as npy_format

    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}[version]
        shape, _, dtype = read_header(stream)  # a header of at most 10,000 bytes, read by literal_eval
    except Exception as exc:
        raise _bad(f"not a readable .npy array of numbers ({str(exc)[:300]})") from None
    if dtype.kind != "f":
        raise _bad(f"a vector must hold floating-point values, not {dtype}")
    _check_shape(shape, d_model)
    return _floats(data, dtype.str, d_model, stream.tell())


def _safetensors(data: bytes, d_model: int, tensor: str | None) -> np.ndarray:
    (length,) = U64.unpack_from(data)
    if length > min(len(data) - 8, MAX_METADATA_BYTES):
        raise _bad(f"not a readable .safetensors file (a header of {length} bytes in a file of {len(data)}; "
                   f"at most {MAX_METADATA_BYTES} are read)")
    try:
        header = json.loads(data[8:8 + length])
    except (ValueError, RecursionError) as exc:
        raise _bad(f"not a readable .safetensors file (its header is not JSON: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise _bad("not a readable .safetensors file (its header is not a JSON object)")
    entry = _single({k: v for k, v in header.items() if k != "__metadata__"}, tensor, ".safetensors")
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
    if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(type(n) is int and n >= 0 for n in [*shape, *offsets])):
        raise _bad("not a readable .safetensors file (a tensor needs a dtype, a shape and two data_offsets)")
    dtype = SAFETENSORS_FLOATS.get(entry.get("dtype"))
    if dtype is None:
        raise _bad(f"a vector must hold floating-point values, not {str(entry.get('dtype'))[:20]}")
    _check_shape(shape, d_model)
    begin, end = offsets
    if end - begin != d_model * _itemsize(dtype):
        raise _bad("not a readable .safetensors file (the tensor's data_offsets do not fit its shape and dtype)")
    return _floats(data, dtype, d_model, 8 + length + begin)


def _check_zip(data: bytes) -> None:
    """torch.save writes uncompressed (stored) zip entries: refuse any other method, sizes that do
    not fit the upload, and metadata records the pickle reader would turn into too many objects.
    Each central directory entry starts with its signature, so counting those bounds zipfile's work."""
    if data.count(b"PK\x01\x02") > MAX_ZIP_ENTRIES:
        raise _bad(f"a .pt file may hold at most {MAX_ZIP_ENTRIES} zip entries")
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except Exception as exc:
        raise _bad(f"not a readable pt file of tensors ({str(exc)[:200]})") from None
    total = 0
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise _bad(f"zip entry {entry.filename[:100]!r} is compressed; torch.save writes every entry uncompressed")
        if not STORAGE_RECORD.fullmatch(entry.filename) and entry.file_size > MAX_METADATA_BYTES:
            raise _bad(f"zip entry {entry.filename[:100]!r} holds {entry.file_size} bytes; a .pt vector's "
                       f"metadata is read up to {MAX_METADATA_BYTES}")
        total += entry.file_size
        if entry.header_offset + entry.file_size > len(data) or total > len(data):
            raise _bad(f"zip entry {entry.filename[:100]!r} claims more bytes than the file holds")


def _torch_vector(value: Any, d_model: int) -> np.ndarray:
    """A dense floating-point tensor's values, checked before one is read (the tensor may be a
    zero-stride view of any length, or have no data at all)."""
    import torch

    if value.layout != torch.strided or value.is_quantized or value.is_meta or value.device.type != "cpu":
        kind = "quantized" if value.is_quantized else "meta" if value.is_meta else str(value.layout).split(".")[-1]
        raise _bad(f"a vector must be a dense tensor of values, not a {kind} tensor")
    if not value.is_floating_point():
        raise _bad(f"a vector must hold floating-point values, not {value.dtype}")
    _check_shape(tuple(value.shape), d_model)
    return value.detach().reshape(-1).to(torch.float32, copy=True).numpy()


def _pt(data: bytes, d_model: int, tensor: str | None) -> np.ndarray:
    import torch  # the server runs beside vLLM, which brings torch

    _check_zip(data)
    with tempfile.NamedTemporaryFile(suffix=".pt") as file:  # mmap: storages are never copied nor inflated
        file.write(data)
        file.flush()
        try:
            loaded = torch.load(file.name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # weights_only refuses pickled objects with an UnpicklingError
            raise _bad(f"not a readable pt file of tensors ({str(exc).splitlines()[0][:300]})") from None
        if isinstance(loaded, dict) and loaded and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in loaded.items()):
            return _torch_vector(_single(loaded, tensor, ".pt"), d_model)
        if isinstance(loaded, torch.Tensor):
            return _torch_vector(_single({"tensor": loaded}, tensor, ".pt"), d_model)
        raise _bad("a .pt file must hold one tensor or a dict of named tensors")


class _GGUFCursor:
    """Reads a GGUF file front to back; every length is checked against the bytes that remain
    before it is used, so a claimed length never allocates or loops past the file."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.walked = data, 0, 0

    def skip(self, size: int) -> int:
        """The offset of the next `size` bytes, stepped over."""
        if size > len(self.data) - self.pos:
            raise _bad(f"not a readable GGUF file (it ends at byte {len(self.data)}, inside a value of {size} bytes "
                       f"at byte {self.pos})")
        start, self.pos = self.pos, self.pos + size
        return start

    def u32(self) -> int:
        return U32.unpack_from(self.data, self.skip(4))[0]

    def u64(self) -> int:
        return U64.unpack_from(self.data, self.skip(8))[0]

    def string(self) -> tuple[int, int]:
        """(offset, length) of a string, stepped over."""
        length = self.u64()
        return self.skip(length), length

    def count(self, min_item_bytes: int, one_by_one: bool) -> int:
        """A count of items of at least `min_item_bytes` each; those read `one_by_one` (keys and
        strings, in Python) are capped too, so time stays bounded where bytes are cheap."""
        count = self.u64()
        if count * min_item_bytes > len(self.data) - self.pos:
            raise _bad(f"not a readable GGUF file ({count} items cannot fit in the {len(self.data) - self.pos} "
                       "bytes that remain)")
        self.walked += count if one_by_one else 0
        if self.walked > MAX_GGUF_VALUES:
            raise _bad(f"the GGUF file has more than {MAX_GGUF_VALUES} keys and strings; a control vector has a few")
        return count

    def skip_value(self, value_type: int) -> None:
        if value_type in GGUF_FIXED:
            self.skip(GGUF_FIXED[value_type])
        elif value_type == GGUF_STRING:
            self.string()
        elif value_type == GGUF_ARRAY:
            item_type = self.u32()
            if item_type in GGUF_FIXED:  # stepped over by arithmetic
                self.skip(self.count(1, False) * GGUF_FIXED[item_type])
            elif item_type == GGUF_STRING:
                for _ in range(self.count(8, True)):
                    self.string()
            else:
                raise _bad(f"not a readable GGUF file (an array of value type {item_type}; nested arrays are not "
                           "read)")
        else:
            raise _bad(f"not a readable GGUF file (unknown value type {value_type})")


def _gguf(data: bytes, d_model: int) -> dict[int | None, np.ndarray]:
    cursor = _GGUFCursor(data)
    cursor.skip(4)  # the magic
    version = cursor.u32()
    if version not in (2, 3):
        raise _bad(f"not a readable GGUF file (version {version}; versions 2 and 3, little-endian, are read)")
    tensor_count, kv_count = cursor.u64(), cursor.count(13, True)  # a key/value is at least 8 + 4 + 1 bytes
    found: dict[bytes, tuple[int, int]] = {}  # the keys a control vector needs: (value type, offset)
    for _ in range(kv_count):
        offset, length = cursor.string()
        key, value_type = data[offset:offset + length] if length <= 32 else b"", cursor.u32()
        if key in (b"general.architecture", b"general.alignment"):
            if key in found:
                raise _bad(f"the GGUF file names {key.decode()} twice")
            found[key] = (value_type, cursor.pos)
        cursor.skip_value(value_type)
    arch = None
    if found.get(b"general.architecture", (None,))[0] == GGUF_STRING:
        at = found[b"general.architecture"][1]
        arch = data[at + 8:at + 8 + min(U64.unpack_from(data, at)[0], 64)].decode("utf-8", "replace")
    if arch != "controlvector":
        raise _bad(f"a GGUF upload must be a control vector (general.architecture 'controlvector'), not {arch!r}")
    alignment = 32
    if b"general.alignment" in found:
        value_type, at = found[b"general.alignment"]
        alignment = U32.unpack_from(data, at)[0] if value_type == GGUF_UINT32 else 0
    if alignment == 0 or alignment % 8:
        raise _bad("not a readable GGUF file (general.alignment must be a uint32 multiple of 8)")
    if tensor_count * 24 > len(data) - cursor.pos:  # name length, n_dims, type, offset: at least 24 bytes
        raise _bad(f"not a readable GGUF file ({tensor_count} tensors cannot fit in what remains)")
    tensors: dict[int, tuple[str, int, str]] = {}  # layer -> (dtype, offset, tensor name)
    for _ in range(tensor_count):
        offset, length = cursor.string()
        name = data[offset:offset + min(length, 32)].decode("utf-8", "replace")
        match = GGUF_DIRECTION.fullmatch(name) if length <= 32 else None
        if match is None:
            raise _bad(f"unexpected tensor {name!r} in a control vector (expected direction.N)")
        n_dims = cursor.u32()
        if n_dims > GGML_MAX_DIMS:
            raise _bad(f"not a readable GGUF file (tensor {name} has {n_dims} dimensions)")
        shape = [cursor.u64() for _ in range(n_dims)]
        ggml_type, data_offset = cursor.u32(), cursor.u64()
        if ggml_type not in GGML_FLOATS:
            raise _bad(f"tensor {name} is of GGML type {ggml_type}; control vectors are F32 or F16")
        _check_shape(shape, d_model)
        layer = int(match.group(1))
        if layer in tensors:
            raise _bad(f"the control vector has two directions for layer {layer}: {tensors[layer][2]} and {name}")
        tensors[layer] = (GGML_FLOATS[ggml_type], data_offset, name)
    if not tensors:
        raise _bad("the control vector holds no direction.N tensors")
    spans = sorted((offset, offset + d_model * _itemsize(dtype)) for dtype, offset, _ in tensors.values())
    if any(end > following for (_, end), (following, _) in zip(spans, spans[1:])):  # 40 bytes, d_model floats
        raise _bad("not a readable GGUF file (two tensors share bytes)")
    start = -(-cursor.pos // alignment) * alignment
    return {layer: _floats(data, dtype, d_model, start + offset) for layer, (dtype, offset, _) in tensors.items()}


def read_vector_file(data: bytes, d_model: int, tensor: str | None = None) -> dict[int | None, np.ndarray]:
    """layer -> d_model float32 values (ANY_LAYER for a file without layers); `tensor` names one
    tensor of a .safetensors or .pt file that holds several."""
    if data.startswith(b"GGUF"):
        if tensor is not None:
            raise _bad("a GGUF control vector holds one tensor per layer: `tensor` does not apply", "tensor")
        return _gguf(data, d_model)
    if data.startswith(b"\x93NUMPY"):
        return {ANY_LAYER: _npy(data, d_model)}
    if data.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        return {ANY_LAYER: _pt(data, d_model, tensor)}
    if len(data) > 8 and data[8:9] == b"{":  # safetensors: a u64 header length, then its JSON header
        return {ANY_LAYER: _safetensors(data, d_model, tensor)}
    raise _bad("unrecognised file: upload a .safetensors, .pt or .npy vector, or a GGUF control vector")
