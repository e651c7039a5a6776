"""Which vLLM steerserve's patches were verified against, and the private symbols they patch.

The plugin hooks vLLM's model runners and fixes two CPU-build problems by replacing private
functions (runner_patch.py, upstream_fixes.py). Under another vLLM such a symbol may be gone or
mean something else, and a patch that quietly does nothing would serve unsteered tokens as
steered ones. So `steerserve serve` refuses a vLLM it was not verified against (a loud warning
instead with STEERSERVE_ALLOW_UNTESTED_VLLM=1), and every patch first requires its target.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

VERIFIED_VLLM_VERSIONS = ("0.32.0",)
ALLOW_UNTESTED_ENV = "STEERSERVE_ALLOW_UNTESTED_VLLM"


class VLLMCompatibilityError(RuntimeError):
    pass


def release_of(version: str) -> str:
    """"0.32.0+cpu" -> "0.32.0": the CPU and CUDA builds of one release share their Python source."""
    return re.split(r"[+]", version, maxsplit=1)[0]


def check_vllm_version(version: str | None = None) -> str | None:
    """None for a verified vLLM; the warning to print for another one when ALLOW_UNTESTED_ENV is
    set; VLLMCompatibilityError otherwise."""
    if version is None:
        import vllm

        version = vllm.__version__
    if release_of(version) in VERIFIED_VLLM_VERSIONS:
        return None
    what = (f"steerserve's vLLM patches were verified against vLLM {', '.join(VERIFIED_VLLM_VERSIONS)}; this is "
            f"vLLM {version}")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return f"{what}. Running anyway ({ALLOW_UNTESTED_ENV}=1): check steering with the differential tests first"
    raise VLLMCompatibilityError(
        f"{what}. Install a verified version (pip install 'steerserve[gpu]' pins it), or set {ALLOW_UNTESTED_ENV}=1 "
        "to run anyway at your own risk")


def require(module: str, qualname: str) -> Any:
    """The patch target `module.qualname`, or VLLMCompatibilityError naming it."""
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        import vllm

        raise VLLMCompatibilityError(
            f"steerserve patches {module}.{qualname}, which vLLM {vllm.__version__} does not have ({exc}); this "
            f"vLLM is not supported (verified: {', '.join(VERIFIED_VLLM_VERSIONS)})") from None
    return target
