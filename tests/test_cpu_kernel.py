"""The native CPU steering kernel against the plain-PyTorch op it replaces (no vLLM engine).

Both run through the same SteeringRuntime (same slots, routing and tables); only the op
differs. Hidden rows in bf16 come out bit-identical in practice; the check allows one bf16
rounding step, since the kernel sums the encoder in a different order than BLAS does.
"""

from __future__ import annotations

import logging

import pytest
import torch

from steerserve_sae.backends import native_cpu, select_backend
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.steering.runtime import SteeringRuntime
from tests.request_views import RequestView
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY
from steerserve_sae.protocol.spec import FeatureEdit, SteeringSpec

D_MODEL, D_SAE = 64, 512


def make_sae(activation: str, dtype: torch.dtype, apply_b_dec: bool = False, d_sae: int = D_SAE, seed: int = 11,
             layer: int = 0) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, D_MODEL, generator=g), dim=-1)
    return SAEWeights(
        layer=layer, W_enc=(w_dec + 0.1 * torch.randn(d_sae, D_MODEL, generator=g)).to(dtype),
        b_enc=(0.05 * torch.randn(d_sae, generator=g)).to(dtype), W_dec=w_dec.to(dtype),
        b_dec=(0.1 * torch.randn(D_MODEL, generator=g)).to(dtype), activation=activation,
        k=16 if activation == "topk" else None,
        threshold=torch.full((d_sae,), 0.2, dtype=dtype) if activation == "jumprelu" else None,
        apply_b_dec_to_input=apply_b_dec, architecture="test", source="memory",
    )


def requests(residual: torch.Tensor, sae: SAEWeights) -> list[RequestView]:
    """Four differently steered requests and an unsteered one, as prefill chunks and decodes:
    clamps and scales of features that are active on the stream, an ablate, adds, and a mix.
    The first request edits 10 active features, more than the kernel rank-counts one by one
    (it selects the k-th value instead); the others edit a few."""
    acts = torch.relu(residual.float() @ sae.W_enc.float().T)
    top = [int(i) for i in acts.sum(0).topk(14).indices]
    many = [FeatureEdit(0, i, "clamp", 2.0 + n) for n, i in enumerate(top[6:])]
    specs = [
        SteeringSpec.create([FeatureEdit(0, top[0], "clamp", 4.0), FeatureEdit(0, top[1], "scale", 3.0), *many]),
        SteeringSpec.create([FeatureEdit(0, top[2], "ablate", 0.0), FeatureEdit(0, 9, "add", 1.5)]),
        SteeringSpec.create([FeatureEdit(0, 17, "add", -2.0)]),
        SteeringSpec.create([FeatureEdit(0, top[3], "clamp", 0.5), FeatureEdit(0, top[4], "clamp", 6.0),
                             FeatureEdit(0, top[5], "scale", 0.0)], apply_to="generation"),
    ]
    views = [RequestView(f"r{i}", {EXTRA_ARGS_KEY: s.to_extra_arg()}, 0, 0, 0) for i, s in enumerate(specs)]
    views.append(RequestView("plain", {}, 0, 0, 0))
    return views


def run_step(kernel: str, sae: SAEWeights, hidden, residual, rows_per_request: list[int], decoding: bool):
    runtime = SteeringRuntime(PluginConfig("mem", (0,), max_features=16, max_configs=8, steering_kernel=kernel),
                              {0: sae}, torch.device("cpu"), max_rows=256)
    assert runtime.kernel_name == {"native": "native-cpu", "torch": "torch", "triton": "triton"}[kernel]
    views = requests(residual, sae)
    for view, n in zip(views, rows_per_request):
        view.num_scheduled, view.num_prompt = n, 6
        view.num_computed = 10 if decoding else 0  # decode rows are generated; prefill rows straddle the prompt
    runtime.begin_step(RequestView.batch(views[: len(rows_per_request)]))
    out = hidden.clone()
    runtime.apply(0, out, residual)
    runtime.verify_applied()
    return out


def case_inputs(activation: str, sae_dtype: torch.dtype, hidden_dtype: torch.dtype, shape: str):
    """(sae, rows per request, hidden, residual) of one kernel-vs-PyTorch case: five requests of
    one decode row each, or prefill chunks (40 rows: tiles of 8 and a rest). Shared with
    test_triton_kernel.py."""
    sae = make_sae(activation, sae_dtype, apply_b_dec=activation == "relu")
    rows = [1, 1, 1, 1, 1] if shape == "decode" else [7, 13, 5, 9, 6]
    g = torch.Generator().manual_seed(12)
    residual = (3 * torch.randn(sum(rows), D_MODEL, generator=g)).to(hidden_dtype)
    hidden = torch.randn(sum(rows), D_MODEL, generator=g).to(hidden_dtype)
    return sae, rows, hidden, residual


def unsteered_rows(rows: list[int]) -> slice:
    """The rows of the last request of `requests`, the unsteered one."""
    return slice(sum(rows[:4]), sum(rows))


def assert_same_edit(native: torch.Tensor, reference: torch.Tensor, before: torch.Tensor) -> None:
    assert not torch.equal(reference, before)  # the step did steer
    if native.dtype == torch.float32:
        torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)
    else:  # at most one bf16 rounding step apart
        torch.testing.assert_close(native.float(), reference.float(), rtol=2 ** -7, atol=1e-3)
        assert (native != reference).float().mean() < 0.01


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("sae_dtype,hidden_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_native_kernel_equals_the_torch_op(activation, sae_dtype, hidden_dtype, shape):
    sae, rows, hidden, residual = case_inputs(activation, sae_dtype, hidden_dtype, shape)
    sae.choose_cpu_encoder()  # as CPU workers do: a small encoder runs in float32 (packed panels)
    reference = run_step("torch", sae, hidden, residual, rows, decoding=shape == "decode")
    native = run_step("native", sae, hidden, residual, rows, decoding=shape == "decode")
    assert_same_edit(native, reference, hidden)
    plain = unsteered_rows(rows)
    assert torch.equal(native[plain], hidden[plain])  # unsteered rows are untouched


def test_native_kernel_with_a_large_encoder_uses_its_stored_dtype():
    """Encoders too big to pack (above SMALL_ENCODER_BYTES) go through ATen's addmm in bf16."""
    sae = make_sae("topk", torch.bfloat16, d_sae=16400)  # 4.2 MB in float32; not a multiple of 16 either
    sae.choose_cpu_encoder()
    assert sae.encoder_compute is None
    rows = [2, 3, 1, 2, 1]
    g = torch.Generator().manual_seed(13)
    residual = (3 * torch.randn(sum(rows), D_MODEL, generator=g)).bfloat16()
    hidden = torch.randn(sum(rows), D_MODEL, generator=g).bfloat16()
    reference = run_step("torch", sae, hidden, residual, rows, decoding=True)
    native = run_step("native", sae, hidden, residual, rows, decoding=True)
    assert sae.encoder_panels is None
    assert_same_edit(native, reference, hidden)


def test_an_unsteered_step_between_equal_steered_steps_keeps_steering():
    """The kernel reads the plan's counts from a buffer: an unsteered step zeroes them, and the
    next steered step (routing equal to the cached plan) must write them again."""
    sae = make_sae("topk", torch.float32)
    runtime = SteeringRuntime(PluginConfig("mem", (0,), steering_kernel="native"), {0: sae}, torch.device("cpu"))
    add = SteeringSpec.create([FeatureEdit(0, 3, "add", 2.0)])
    steered = RequestView.batch([RequestView("a", {EXTRA_ARGS_KEY: add.to_extra_arg()}, 1, 4, 2)])
    plain = RequestView.batch([RequestView("b", {}, 1, 4, 2)])
    for batch, expected in ((steered, 2.0 * sae.W_dec[3]), (plain, torch.zeros(D_MODEL)), (steered, 2.0 * sae.W_dec[3])):
        runtime.begin_step(batch)
        hidden = torch.zeros(1, D_MODEL)
        runtime.apply(0, hidden, torch.zeros(1, D_MODEL))
        torch.testing.assert_close(hidden[0], expected)


def test_backend_choice(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert select_backend("torch", cpu, 16, 4).name == "torch"
    assert select_backend("auto", torch.device("meta"), 16, 4).name == "torch"  # native is CPU-only
    assert select_backend("native", cpu, 16, 4).name == "native-cpu"
    with pytest.raises(ValueError, match="--steering-kernel must be one of"):
        select_backend("fast", cpu, 16, 4)
    monkeypatch.setattr(native_cpu, "_loaded", False)
    monkeypatch.setattr(native_cpu, "_failure", "RuntimeError: no C++ compiler (c++ / g++) on PATH")
    with caplog.at_level(logging.WARNING, logger="vllm.steerserve"):
        assert select_backend("auto", cpu, 16, 4).name == "torch"
    assert "no C++ compiler" in caplog.text
    with pytest.raises(RuntimeError, match="did not build: RuntimeError: no C\\+\\+ compiler"):
        select_backend("native", cpu, 16, 4)
