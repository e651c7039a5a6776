"""The plugin's hooks against the installed vLLM's two model runners.

Both runners are exercised end to end by the differential tests (V2 through Triton's
interpreter, conftest.runner_env); here the hooks are pinned to the vLLM source they wrap: the
methods must be wrapped after `register()`, and every attribute the V2 routing reads must exist
under the name and meaning it uses (tests/test_vllm_contract.py does the same against every
supported release's own source).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")


def test_register_patches_nothing_outside_steerserve():
    """Installing steerserve must not change other vLLM programs in the same environment."""
    code = ("import steerserve_sae; steerserve_sae.register(); "
            "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R; "
            "print(getattr(R._prepare_inputs, '_steerserve', False))")
    env = {k: v for k, v in os.environ.items() if k != "STEERSERVE_ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


@pytest.fixture(scope="module")
def v2_runner():
    import steerserve_sae

    os.environ[steerserve_sae.ACTIVATION_ENV] = "1"  # as `steerserve serve` sets it for vLLM's processes
    steerserve_sae.register()
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return GPUModelRunner


def test_register_wraps_both_model_runners(v2_runner):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    for cls, names in ((V1Runner, ("_prepare_inputs", "_dummy_run", "_model_forward", "execute_model", "load_model")),
                       (v2_runner, ("add_requests", "prepare_inputs", "execute_model", "load_model"))):
        for name in names:
            assert _is_hook(getattr(cls, name)), f"{cls.__module__}.{name} is not hooked"
    import steerserve_sae

    steerserve_sae.register()  # idempotent: wrapping twice would route every step twice
    assert not _is_hook(v2_runner.prepare_inputs.__wrapped__)
    assert not _is_hook(V1Runner._prepare_inputs.__wrapped__)


def _is_hook(method) -> bool:
    return method.__code__.co_filename.endswith("sae_plugins/steerserve_sae/vllm_hooks/runner_patch.py")


def test_v2_routing_reads_fields_that_exist(v2_runner):
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.worker.gpu.input_batch import InputBatch

    batch_fields = {f.name for f in dataclasses.fields(InputBatch)}
    assert {"req_ids", "idx_mapping_np", "num_scheduled_tokens", "num_computed_tokens_np"} <= batch_fields
    assert {"req_id", "sampling_params"} <= {f.name for f in dataclasses.fields(NewRequestData)}
    assert {"finished_req_ids", "scheduled_new_reqs"} <= {f.name for f in dataclasses.fields(SchedulerOutput)}
    from vllm.v1.worker.gpu.states import RequestState

    # prompt_len, not prefill_len: a resumed request's prefill also holds its generated tokens,
    # and generation-only steering must keep treating those as generated.
    assert "self.prompt_len = UvaBackedTensor" in inspect.getsource(RequestState.__init__)
    original = inspect.signature(inspect.unwrap(v2_runner.execute_model))
    assert "dummy_run" in original.parameters
    assert list(inspect.signature(v2_runner.prepare_inputs.__wrapped__).parameters)[:2] == ["self", "scheduler_output"]
    assert list(inspect.signature(v2_runner.add_requests.__wrapped__).parameters)[:2] == ["self", "scheduler_output"]


def test_this_build_cannot_run_asynchronous_scheduling():
    """Why --sae keeps async scheduling off (docs/vllm-versions.md): the differential tests cannot
    prove per-row steering under it here, because vLLM's CPU platform turns it off whatever the
    options say. The day a CPU build runs it, this fails: run the differential tests with it on."""
    from vllm.platforms.cpu import CpuPlatform

    source = inspect.getsource(CpuPlatform.check_and_update_config)
    assert "scheduler_config.async_scheduling = False" in source


@pytest.mark.parametrize("build,requested,chosen", [
    ("cuda", None, None),  # vLLM's own choice: V2 where it supports the model
    ("cpu", None, "0"),  # V1, measured faster on the CPU build (docs/vllm-versions.md)
    ("cpu", "1", "1"), ("cuda", "0", "0"),  # an explicit choice stays
])
def test_the_runner_is_vllms_choice_on_gpus_and_v1_on_this_build(monkeypatch, build, requested, chosen):
    from steerserve.cli.engine_checks import choose_model_runner
    from steerserve_sae.vllm_hooks import compat

    monkeypatch.setattr(compat, "installed_build", lambda: build)
    if requested is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", requested)
    choose_model_runner()
    assert os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == chosen
