"""Start-up errors of `steerserve serve` that must stop the server before vLLM starts."""

from __future__ import annotations

import json
import os
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
    assert ("Qwen3ForCausalLM, Qwen3MoeForCausalLM, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, "
            "Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration\n") in result.stderr


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


@pytest.fixture(scope="module")
def parse():
    """steerserve serve's own parser (vLLM's, with the SAE options): no engine starts."""
    from steerserve.cli.serve import build_parser

    parser = build_parser()
    return lambda *argv: parser.parse_args(["serve", "model", *argv])


@pytest.mark.parametrize(("argv", "env", "check", "message"), [
    (["--grpc"], {}, "refuse_frontends_without_the_app",
     "error: steerserve cannot serve with --grpc: vLLM's gRPC server serves without steerserve's app, so no API key "
     "would be checked and no steering applied"),
    ([], {"VLLM_USE_RUST_FRONTEND": "1"}, "refuse_frontends_without_the_app",
     "error: steerserve cannot serve with VLLM_USE_RUST_FRONTEND=1: vLLM's Rust frontend serves without steerserve's "
     "app, so no API key would be checked and no steering applied; unset it"),
    ([], {"VLLM_USE_RUST_FRONTEND": "yes"}, "refuse_frontends_without_the_app",
     "error: VLLM_USE_RUST_FRONTEND='yes': vLLM reads it as a number (0 or 1)"),
    ([], {"VLLM_USE_BREAKABLE_CUDAGRAPH": "1"}, "keep_steering_out_of_cuda_graphs",
     "error: VLLM_USE_BREAKABLE_CUDAGRAPH=1 would capture the steering op inside a CUDA graph and freeze its "
     "per-request routing; unset it with --sae"),
    (["-cc", '{"pass_config": {"fuse_attn_quant": true}}'], {}, "keep_steering_out_of_cuda_graphs",
     "error: fuse_attn_quant (in --compilation-config's pass_config) cannot be combined with --sae: it removes the "
     "graph splitting ops, so the steering op would be captured inside a CUDA graph"),
    (["-cc", '{"splitting_ops": ["vllm::unified_attention"]}'], {}, "keep_steering_out_of_cuda_graphs",
     "error: splitting_ops in --compilation-config replaces vLLM's list, which holds the steering op; add "
     "'steerserve::steer_residual' to it (or leave splitting_ops unset) with --sae"),
    (["-cc", '{"splitting_ops": []}'], {}, "keep_steering_out_of_cuda_graphs",
     "error: splitting_ops in --compilation-config replaces vLLM's list"),
    (["--watermark-config", '{"type": "gumbel"}'], {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "refuse_model_runner_overrides",
     "error: --watermark-config cannot be combined with --sae or --steering-layers on vLLM's V1 model runner: "
     "watermarking makes vLLM switch to Model Runner V2"),
])
def test_ways_around_steering_are_refused_before_the_engine_starts(parse, monkeypatch, capsys, argv, env, check,
                                                                   message):
    """Frontends without steerserve's app (no key check: steerserve takes --api-key from vLLM),
    options that capture the steering op inside a CUDA graph, and options that change the model
    runner (vLLM 0.32: envs.py, cli/serve.py, config/compilation.py, config/vllm.py)."""
    from steerserve.cli import engine_checks

    for name in ("VLLM_USE_RUST_FRONTEND", "VLLM_USE_BREAKABLE_CUDAGRAPH", "VLLM_BATCH_INVARIANT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as refused:
        getattr(engine_checks, check)(parse(*argv))
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("batch_invariant", ["0", "1"])
def test_breakable_cuda_graphs_are_kept_off_and_safe_options_pass(parse, monkeypatch, capsys, batch_invariant):
    """Unset, vLLM turns breakable graphs on by itself for some architectures and with
    VLLM_BATCH_INVARIANT=1 on bf16 CUDA (VllmConfig._maybe_enable_breakable_cudagraph, only while
    the variable is unset): set to 0. A splitting_ops list with the steering op, a watermark on
    Model Runner V2 when asked for, and fuse_attn_quant left to vLLM (set off) pass."""
    from vllm.config.compilation import CUDAGraphMode

    from steerserve.cli import engine_checks

    monkeypatch.delenv("VLLM_USE_BREAKABLE_CUDAGRAPH", raising=False)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", batch_invariant)
    args = parse("-cc", '{"splitting_ops": ["vllm::unified_attention", "steerserve::steer_residual"]}',
                 "--watermark-config", '{"type": "gumbel"}')
    engine_checks.keep_steering_out_of_cuda_graphs(args)
    assert os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] == "0"
    assert args.compilation_config.pass_config.fuse_attn_quant is False
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    said = capsys.readouterr().err
    assert ("VLLM_BATCH_INVARIANT=1 would turn on" in said) == (batch_invariant == "1")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    engine_checks.refuse_model_runner_overrides(args)
    engine_checks.refuse_frontends_without_the_app(args)


def test_a_data_dir_whose_runner_another_server_holds_is_refused_before_the_engine(fake_model, tmp_path):
    """The command-line half of the data-dir refusal (test_batch_units.py has the app's)."""
    from argparse import Namespace

    from steerserve.batch.identity import RunnerLock, server_identity

    holder = RunnerLock(tmp_path)
    assert holder.acquire(server_identity(Namespace(model="another/model", served_model_name=[str(fake_model)])))
    try:
        result = serve(str(fake_model), "--data-dir", str(tmp_path))
    finally:
        holder.release()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"error: --data-dir {tmp_path} is in use by another steerserve server (model another/model served as "
        f"{fake_model} (no SAE, dtype None), pid {os.getpid()}), whose batch runner holds {tmp_path}/runner.lock; "
        f"this server (model {fake_model} served as {fake_model} (no SAE, dtype auto))")
