"""Start-up errors of `steerserve serve` that must stop the server before vLLM starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, server_env
from tests.fixtures.tiny_model import MARKER
from tests.sae_files import write_qwen_scope


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steerserve", "serve", *args, "--port", "1"],
        capture_output=True, text=True, env=server_env() | (env or {}), cwd=ROOT, timeout=300,
    )


@pytest.fixture
def fake_model(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    return model


def test_unsupported_architecture_names_the_supported_ones(fake_model, tiny_model_dir):
    config = json.loads((fake_model / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (fake_model / "config.json").write_text(json.dumps(config))
    result = serve(str(fake_model), "--sae", str(tiny_model_dir / "sae"), "--sae-layers", "1")
    assert result.returncode != 0
    assert "does not support the architecture ['LlamaForCausalLM']" in result.stderr
    assert "Qwen3ForCausalLM, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration" in result.stderr


def test_missing_layer_file_lists_available_layers(fake_model, tiny_model_dir):
    result = serve(str(fake_model), "--sae", str(tiny_model_dir / "sae"), "--sae-layers", "1,7")
    assert result.returncode != 0
    assert "has no SAE for layers [7]; it has layers [0, 1, 2, 3]" in result.stderr


def test_sae_shape_not_fitting_hidden_size_names_the_file(fake_model, tmp_path):
    sae_dir = tmp_path / "sae64"
    write_qwen_scope(sae_dir, layers=[1], d_model=64, d_sae=32, k=4)
    result = serve(str(fake_model), "--sae", str(sae_dir), "--sae-layers", "1")
    assert result.returncode != 0
    assert "sae64/config.json: d_model is 64 but the model's hidden size is 128" in result.stderr


def test_sae_tensor_shape_not_fitting_names_the_layer_file(fake_model, tmp_path):
    sae_dir = tmp_path / "sae-bad-tensor"
    write_qwen_scope(sae_dir, layers=[1], d_model=64, d_sae=32, k=4, config={"d_model": 128})
    result = serve(str(fake_model), "--sae", str(sae_dir), "--sae-layers", "1")
    assert result.returncode != 0
    assert "layer1.sae.pt" in result.stderr and "hidden size is 128" in result.stderr


def test_unknown_sae_format_is_named(fake_model, tmp_path):
    (tmp_path / "empty").mkdir()
    result = serve(str(fake_model), "--sae", str(tmp_path / "empty"), "--sae-layers", "1")
    assert result.returncode != 0
    assert "layer{n}.sae.pt" in result.stderr or "sae_weights.safetensors" in result.stderr


@pytest.mark.parametrize(("name", "k_option", "message"), [
    ("SAE-Res-Tiny-W1K-L0_50", ["--sae-k", "100"],
     "conflicting k for its Qwen-Scope SAEs: the name 'SAE-Res-Tiny-W1K-L0_50' says k=50; --sae-k says k=100"),
    ("renamed", [], "no k for its Qwen-Scope SAEs (layer{n}.sae.pt files hold only tensors); give it one of "
                    "three ways"),
])
def test_qwen_scope_k_errors_stop_start_up_whatever_the_model(tmp_path, name, k_option, message):
    """Checked before the engine starts even for a hub model, whose SAE shapes only the workers see."""
    write_qwen_scope(tmp_path / name, layers=[1], d_sae=1024, with_config=False)
    result = serve("Qwen/Qwen3.5-27B", "--sae", str(tmp_path / name), "--sae-layers", "1", *k_option,
                   env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert f"error: --sae {tmp_path / name}: {tmp_path / name}: {message}" in result.stderr


def test_hub_sae_not_in_the_offline_cache(fake_model, tmp_path):
    result = serve(str(fake_model), "--sae", "Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50@v1", "--sae-layers", "8",
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode != 0
    assert (f"error: --sae: Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50@v1: the repo (and no local directory "
            f"Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50 exists) is not in the Hugging Face cache ({tmp_path}) and "
            "HF_HUB_OFFLINE is set: unset it, or fetch the files with "
            "`hf download Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50 layer8.sae.pt --revision v1` into the same "
            "HF_HUB_CACHE") in result.stderr


def test_sae_needs_layers(fake_model, tiny_model_dir):
    result = serve(str(fake_model), "--sae", str(tiny_model_dir / "sae"))
    assert result.returncode != 0
    assert "--sae needs --sae-layers" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}'],
     "--sae cannot be combined with --speculative-config"),
    (["--enable-dbo"], "--sae cannot be combined with --enable-dbo"),
    (["--async-scheduling"], "--sae cannot be combined with --async-scheduling"),
])
def test_unverified_row_layouts_are_refused_with_sae(fake_model, tiny_model_dir, flags, message):
    """Features that change which rows a step holds, not verified against the routing."""
    result = serve(str(fake_model), "--sae", str(tiny_model_dir / "sae"), "--sae-layers", "1", *flags)
    assert result.returncode != 0
    assert message in result.stderr


def test_tiny_model_build_is_idempotent(tiny_model_dir):
    """`make tiny-model OUT=DIR` runs this: a complete build is left as it is."""
    built = (tiny_model_dir / MARKER).stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.tiny_model", str(tiny_model_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == str(tiny_model_dir)
    assert (tiny_model_dir / MARKER).stat().st_mtime_ns == built
