"""Files a hostile client uploads (issue 28), built in memory so that any test can send them.

Each builder returns the bytes of one file. Small on the wire, each asks the reader for far
more than it is: a GGUF whose header claims 2^40 array items, a .pt of a zero-stride view that
is gigabytes once materialised, a .pt zip whose data is deflated about 1000:1; or it holds
what a vector must not: meta, sparse or quantized tensors, two GGUF tensors for one layer,
components whose norm overflows float32.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tempfile
import zipfile

import numpy as np

GGUF_UINT32, GGUF_STRING, GGUF_ARRAY = 4, 8, 9  # GGUF value types (gguf.GGUFValueType)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_array_bomb(items: int = 2**40) -> bytes:
    """104 bytes: a GGUF v3 control vector header whose second key/value is an ARRAY of uint32
    claiming `items` items, none of which follow."""
    kvs = (_gguf_string("general.architecture") + struct.pack("<I", GGUF_STRING) + _gguf_string("controlvector")
           + _gguf_string("bom") + struct.pack("<IIQ", GGUF_ARRAY, GGUF_UINT32, items))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kvs


def control_vector_gguf(tensors: dict[str, np.ndarray]) -> bytes:
    """A control vector GGUF (arch `controlvector`) holding `tensors` under their names as given,
    e.g. both `direction.0` and `direction.00`: two tensors for one layer."""
    import gguf

    fd, path = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(path, "controlvector")
        writer.add_uint32("controlvector.layer_count", len(tensors))
        for name, values in tensors.items():
            writer.add_tensor(name, np.asarray(values, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def torch_file(value) -> bytes:
    """`torch.save(value)`: a zip archive of a pickle and the storages."""
    import torch

    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def zero_stride_pt(items: int = 2**28) -> bytes:
    """About 1.5 KB: `torch.zeros(1).expand(items)`, one stored float that is `items` once copied."""
    import torch

    return torch_file(torch.zeros(1).expand(items))


@functools.cache
def deflated_pt(items: int = 2**26) -> bytes:
    """A .pt of `items` zero float32s (256 MiB by default) whose zip entries are deflated:
    a few hundred KiB that inflate about 1000:1."""
    import torch

    stored = zipfile.ZipFile(io.BytesIO(torch_file(torch.zeros(items))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as deflated:
        for info in stored.infolist():
            deflated.writestr(info.filename, stored.read(info.filename))
    return out.getvalue()


def meta_pt(d_model: int) -> bytes:
    import torch

    return torch_file(torch.empty(d_model, device="meta"))


def sparse_pt(d_model: int) -> bytes:
    import torch

    return torch_file(torch.ones(d_model).to_sparse())


def quantized_pt(d_model: int) -> bytes:
    import torch

    return torch_file(torch.quantize_per_tensor(torch.ones(d_model), 0.1, 0, torch.qint8))


def npy_file(values) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(values))
    return out.getvalue()


def overflowing_norm(d_model: int) -> np.ndarray:
    """Finite float32 components whose L2 norm is past float32's largest value (3e38 each, so
    any d_model of 2 or more overflows: sqrt(d_model) * 3e38 > 3.4e38)."""
    values = np.full(d_model, 3e38, dtype=np.float32)
    assert np.isfinite(values).all() and np.sqrt(d_model) * 3e38 > FLOAT32_MAX
    return values
