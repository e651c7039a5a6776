"""The native CPU steering backend: kernels/steer_rows_cpu.cpp, built on first use.

On CPU the PyTorch reference is ~20 eager kernels whose dispatch costs more than their math
for a few rows; the native op does the same edit in one call, reading the runtime's fixed
buffers (counts included), so nothing in the forward branches on request data. It is compiled
once per machine with PyTorch's C++ extension toolchain (a C++ compiler; ~25 s) into torch's
extension cache, which every later process loads in milliseconds.

`--steering-kernel` picks: "auto" (native when it builds, else PyTorch with a logged reason),
"native" (fail start-up if it cannot build), "torch" (never build).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch

from steerserve_sae.backends.base import KernelBackend, LayerBuffers

logger = logging.getLogger("vllm.steerserve")

KERNEL_CHOICES = ("auto", "native", "torch")
SOURCE = Path(__file__).with_name("kernels") / "steer_rows_cpu.cpp"
_EXTENSION_NAME = "steerserve_cpu_steering"

_loaded: bool | None = None
_failure = ""


def _cpu_tag() -> str | None:
    """A short digest of this CPU's instruction-set flags, or None where they cannot be read.
    The kernel is built for the host CPU (-march=native), so the build is cached per flag set:
    a cache directory shared with a different CPU never loads code it cannot run."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _build() -> None:
    from torch.utils.cpp_extension import load

    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler (c++ / g++) on PATH")
    tag = _cpu_tag()
    name, flags = (f"{_EXTENSION_NAME}_{tag}", ["-O3", "-march=native"]) if tag else (_EXTENSION_NAME, ["-O3"])
    load(name, sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False, verbose=False)


def native_steer_rows():
    """`torch.ops.steerserve_cpu.steer_rows`, building it if needed; None (and a reason in
    `failure()`) when it cannot be built here."""
    global _loaded, _failure
    if _loaded is None:
        try:
            _build()
            _loaded = True
        except Exception as exc:  # a missing toolchain must not take steering down with it
            _loaded, _failure = False, f"{type(exc).__name__}: {exc}"
    return torch.ops.steerserve_cpu.steer_rows if _loaded else None


def failure() -> str:
    return _failure


class NativeCPUSteering(KernelBackend):
    name = "native-cpu"

    def __init__(self, op):
        super().__init__()
        self._op = op  # torch.ops.steerserve_cpu.steer_rows

    def launch(self, hidden, residual, *arguments) -> None:
        self._op(hidden, residual, *arguments)

    def prepare(self, layer: LayerBuffers) -> None:
        if layer.sae is not None:
            layer.sae.pack_encoder_panels()  # before the arguments are taken: they include the panels
        super().prepare(layer)


def native_backend(choice: str, device: torch.device) -> NativeCPUSteering | None:
    """The native backend on `device` under `--steering-kernel choice`, or None for PyTorch."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"--steering-kernel must be one of {KERNEL_CHOICES + ('triton',)}, not {choice!r}")
    if choice == "torch" or device.type != "cpu":
        return None
    op = native_steer_rows()
    if op is None:
        if choice == "native":
            raise RuntimeError(f"steerserve: the native CPU steering kernel did not build: {_failure}")
        logger.warning("steerserve: native CPU steering kernel unavailable (%s); using the PyTorch op", _failure)
        return None
    return NativeCPUSteering(op)
