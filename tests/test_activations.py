"""One definition of each SAE activation (sae_plugins/steerserve_sae/sae/activations.py), and every path held to
it: the dense encode (inspect, captures), the touched-feature activations of the PyTorch edit,
the native CPU kernel and (in test_triton_kernel.py) the Triton kernels. The two cases where
the paths used to disagree are pinned with exact arithmetic: a negative JumpReLU threshold, and
features tied with the k-th largest pre-activation."""

from __future__ import annotations

import pytest
import torch

from steerserve_sae.sae import sae_math
from steerserve_sae.sae.activations import JumpReLU, ReLU, TopK
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.steering.runtime import SteeringRuntime
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY
from steerserve_sae.protocol.spec import FeatureEdit, SteeringSpec
from tests.request_views import RequestView

D_MODEL, D_SAE = 64, 512


def test_topk_keeps_exactly_k_lowest_index_among_ties():
    pre = torch.tensor([[1.0, 3.0, 3.0, 3.0, 2.0, 3.0], [5.0, 2.0, 2.0, 2.0, 1.0, -1.0]])
    assert TopK(2).dense(pre).tolist() == [[0, 3, 3, 0, 0, 0], [5, 2, 0, 0, 0, 0]]
    assert TopK(3).dense(pre).tolist() == [[0, 3, 3, 3, 0, 0], [5, 2, 2, 0, 0, 0]]
    assert TopK(6).dense(pre).tolist() == [[1, 3, 3, 3, 2, 3], [5, 2, 2, 2, 1, 0]]  # then ReLU


def test_jumprelu_keeps_the_relu_under_a_negative_threshold():
    pre = torch.tensor([[-0.5, -0.1, 0.3, -2.0]])
    assert JumpReLU(torch.full((4,), -1.0)).dense(pre).tolist() == [[0.0, 0.0, pytest.approx(0.3), 0.0]]
    assert JumpReLU(torch.tensor([0.0, 0.0, 0.5, 0.0])).dense(pre).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert ReLU().dense(pre).tolist() == [[0.0, 0.0, pytest.approx(0.3), 0.0]]


@pytest.mark.parametrize("activation", [TopK(5), JumpReLU(torch.linspace(-1, 1, 40)), ReLU()])
def test_gather_equals_dense_even_with_ties(activation):
    g = torch.Generator().manual_seed(0)
    pre = (torch.randn(6, 40, generator=g) * 2).round() / 2  # coarse values: many exact ties
    ids = torch.randint(0, 40, (6, 7), generator=g)
    assert torch.equal(activation.gather(pre, ids), activation.dense(pre).gather(-1, ids))


# ---------------------------------------------------------------- every path against the definition

# Residual stream x = hidden + residual = 1.0 in every dimension; encoder rows with entries 1/16
# times small integers, so every pre-activation is exact in bf16 and in any summation order.
FEATURE_PRE = {10: 4.0, 11: 4.0, 20: 2.0, 21: 2.0, 22: 2.0, 23: 2.0, 30: -0.5, 31: 1.5,
               **{40 + i: 1.0 for i in range(8)}}
TIES = SteeringSpec.create([FeatureEdit(0, 21, "clamp", 5.0), FeatureEdit(0, 22, "clamp", 5.0)])
MANY = SteeringSpec.create([FeatureEdit(0, 21, "clamp", 3.0), FeatureEdit(0, 22, "scale", 2.0),
                            *(FeatureEdit(0, 40 + i, "clamp", 2.0) for i in range(8))])  # > 8: k-th selection
NEGATIVE = SteeringSpec.create([FeatureEdit(0, 30, "clamp", 3.0), FeatureEdit(0, 31, "clamp", 0.5)])


def exact_sae(activation: str, dtype: torch.dtype) -> SAEWeights:
    W_enc = torch.zeros(D_SAE, D_MODEL)
    for feature, pre in FEATURE_PRE.items():
        W_enc[feature, : int(abs(pre) * 16)] = (1 if pre > 0 else -1) / 16
    g = torch.Generator().manual_seed(5)
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_MODEL, generator=g), dim=-1)
    return SAEWeights(
        layer=0, W_enc=W_enc.to(dtype), b_enc=torch.zeros(D_SAE, dtype=dtype), W_dec=W_dec.to(dtype),
        b_dec=torch.zeros(D_MODEL, dtype=dtype), activation=activation, k=4 if activation == "topk" else None,
        threshold=torch.full((D_SAE,), -1.0, dtype=dtype) if activation == "jumprelu" else None,
        apply_b_dec_to_input=False, architecture="test", source="memory",
    )


def exact_cases():
    """(name, sae, spec, hidden, residual) for each case every path must get right."""
    for dtype in (torch.bfloat16, torch.float32):
        hidden, residual = torch.full((1, D_MODEL), 0.5, dtype=dtype), torch.full((1, D_MODEL), 0.5, dtype=dtype)
        for name, activation, spec in (("ties", "topk", TIES), ("ties-many", "topk", MANY),
                                       ("negative-threshold", "jumprelu", NEGATIVE)):
            yield f"{name}/{dtype}", exact_sae(activation, dtype), spec, hidden, residual


def by_definition(sae: SAEWeights, spec: SteeringSpec, hidden: torch.Tensor, residual: torch.Tensor):
    """The edit computed straight from the definition: the dense code, then each touched term."""
    x = hidden.float() + residual.float()
    f = sae.activation_fn.dense(x @ sae.W_enc.float().T + sae.b_enc.float())[0]
    delta = torch.zeros(D_MODEL)
    for e in spec.features:
        coefficient = (e.value - f[e.index]) if e.mode == "clamp" else (e.value - 1) * f[e.index]
        delta += coefficient * sae.W_dec[e.index].float()
    return (hidden.float() + delta).to(hidden.dtype)


def steer(kernel: str, sae: SAEWeights, spec: SteeringSpec, hidden, residual) -> torch.Tensor:
    runtime = SteeringRuntime(PluginConfig("mem", (0,), max_features=16, max_configs=2, steering_kernel=kernel),
                              {0: sae}, torch.device("cpu"), max_rows=16)
    runtime.begin_step(RequestView.batch([RequestView("r", {EXTRA_ARGS_KEY: spec.to_extra_arg()}, 1, 4, 2)]))
    out = hidden.clone()
    runtime.apply(0, out, residual)
    return out


def test_the_definition_differs_from_the_old_rules():
    """So the kernel tests below are not vacuous: the old tie rule (every feature tied with the
    k-th counts as active) and the old JumpReLU (no ReLU) give other edits."""
    sae = exact_sae("topk", torch.float32)
    x = torch.ones(1, D_MODEL)
    f = sae_math.encode(sae, x)[0]
    assert (f[20], f[21], f[22], f[23]) == (2.0, 2.0, 0.0, 0.0) and int((f > 0).sum()) == 4
    negative = exact_sae("jumprelu", torch.float32)
    assert sae_math.encode(negative, x)[0, 30] == 0.0  # pre -0.5 is above the -1 threshold: ReLU'd


@pytest.mark.parametrize("case", list(exact_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_every_path_implements_the_definition(case, kernel):
    _, sae, spec, hidden, residual = case
    if kernel == "native":
        sae.choose_cpu_encoder()  # as CPU workers do (float32 packed panels for a small encoder)
    expected = by_definition(sae, spec, hidden, residual)
    assert not torch.equal(expected, hidden)
    torch.testing.assert_close(steer(kernel, sae, spec, hidden, residual).float(), expected.float(),
                               rtol=0, atol=1e-5 if hidden.dtype == torch.float32 else 2 ** -7)


def test_inspect_and_the_edit_agree_on_which_tied_feature_is_active():
    """A clamp of a tied feature that inspect reports as 0 treats it as 0 (was: active)."""
    sae = exact_sae("topk", torch.float32)
    x = torch.ones(1, D_MODEL)
    dense = sae_math.encode(sae, x)
    ids = torch.tensor([[20, 21, 22, 23]])
    assert torch.equal(sae_math.feature_activations(sae, x, ids), dense.gather(-1, ids))
