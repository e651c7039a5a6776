"""`steerserve eval` against the shared server, its numbers checked independently: FVU and L0
recomputed in plain PyTorch from the reference model's residual stream (tests/hf_reference.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import API_KEY, ROOT, SAE_LAYERS

TEXTS = ["The weather report for today says rain in the north and sun in the south.",
         "To bake bread, mix flour, water, salt and yeast, then let the dough rise.",
         "The train to the city leaves at eight, but on Sundays it only runs every two hours."]


@pytest.fixture(scope="module")
def report(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    (work / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "steerserve", "eval", "--base-url", server.base_url, "--api-key", API_KEY,
         "--data", str(work / "texts.txt"), "--features", "1:3", "--modes", "clamp,ablate", "--values", "0,8",
         "--output-dir", str(work / "out")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SAE quality on 3 texts" in run.stdout
    return work / "out", json.loads((work / "out" / "report.json").read_text())


def independent_quality(reference, layer: int) -> tuple[float, float]:
    """(FVU, L0) over the texts' tokens, from the reference's own stream and SAE."""
    xs, fs = [], []
    for text in TEXTS:
        ids = reference.tokenizer.encode(text)
        x = reference.residual_stream(ids)[layer]
        xs.append(x)
        fs.append(reference.encode(layer, x))
    x, f = torch.cat(xs), torch.cat(fs)
    x_hat = reference.sae(layer).decode(f)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
    return fvu, float((f > 0).sum(dim=-1).float().mean())


@pytest.mark.parametrize("layer", SAE_LAYERS)
def test_quality_matches_an_independent_computation(report, reference, layer):
    _, data = report
    quality = data["sae_quality"][str(layer)]
    fvu, l0 = independent_quality(reference, layer)
    assert quality["tokens"] == sum(len(reference.tokenizer.encode(t)) for t in TEXTS)
    assert quality["fvu"] == pytest.approx(fvu, rel=0.05)
    assert quality["l0"] == pytest.approx(l0, abs=0.1)
    assert 0 <= quality["dead_fraction"] < 1


def test_steering_sweep_and_outputs(report):
    out, data = report
    rows = {(s["mode"], s["value"]): s for s in data["steering"]}
    assert set(rows) == {("clamp", 0.0), ("clamp", 8.0), ("ablate", 0.0), ("ablate", 8.0)}
    # clamping an inactive feature to 0 changes nothing; to 8 it fires, costs and changes text
    assert rows[("clamp", 0.0)]["achieved_activation"] == 0 and rows[("clamp", 0.0)]["nll_increase"] == 0
    assert rows[("clamp", 0.0)]["kl"] == 0 and rows[("clamp", 8.0)]["kl"] > 0.01
    assert rows[("clamp", 8.0)]["achieved_activation"] > 4 and rows[("clamp", 8.0)]["nll_increase"] > 0
    assert rows[("clamp", 8.0)]["greedy_changed"] > 0
    assert rows[("ablate", 8.0)]["achieved_activation"] == 0  # ablate ignores the value
    for name in ("report.json", "sae_quality.png", "steering_L1_3.png"):
        assert (out / name).stat().st_size > 0


def reference_logprobs(reference, ids: list[int], splice_layer: int | None) -> torch.Tensor:
    """Next-token log-probabilities at every position but the last, optionally with `splice_layer`'s output
    replaced by its SAE reconstruction (a plain forward hook on the Hugging Face model).

    vLLM carries the stream as bf16 `hidden + residual`, so the server can only write the
    reconstruction as bf16(x_hat - residual) on top of the residual. The tiny circuit is very
    sensitive to that rounding once spliced (at layer 2 the NLL increase is ~48 nats with x_hat
    rounded directly, ~32 with it rounded as a difference), so the reference rounds the same way,
    with the stream standing in for vLLM's residual."""
    handle = None
    if splice_layer is not None:
        sae = reference.sae(splice_layer)

        def splice(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            x = hidden[0].float()
            x_hat = sae.decode(sae.encode(x))
            x_hat = ((x_hat - x).to(hidden.dtype).float() + x).to(hidden.dtype)[None]
            return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

        handle = reference.layers[splice_layer].register_forward_hook(splice)
    try:
        with torch.no_grad():
            logits = reference.model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits[:-1], dim=-1)


def reference_nll(reference, ids: list[int], splice_layer: int | None) -> float:
    """Mean NLL of the text's tokens after the first."""
    logprobs = reference_logprobs(reference, ids, splice_layer)
    return float(-logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).mean())


@pytest.mark.parametrize("layer", SAE_LAYERS)
def test_splice_cost_matches_an_independent_computation(report, reference, layer):
    _, data = report
    ids = [reference.tokenizer.encode(text) for text in TEXTS]
    spliced = sum(reference_nll(reference, i, layer) for i in ids) / len(ids)
    plain = sum(reference_nll(reference, i, None) for i in ids) / len(ids)
    assert data["sae_quality"][str(layer)]["splice_nll_increase"] == pytest.approx(spliced - plain, rel=0.05, abs=0.15)
    assert abs(spliced - plain) > 0.15  # the check is not vacuous: splicing this SAE costs something


def listed(logprobs: torch.Tensor, actual: int, k: int = 20) -> dict[str, float]:
    """What vLLM returns for one position: the top k log-probabilities plus the actual token's."""
    top = {str(i): float(logprobs[i]) for i in logprobs.topk(k).indices.tolist()}
    return top | {str(actual): float(logprobs[actual])}


@pytest.mark.parametrize("layer", SAE_LAYERS)
def test_splice_kl_matches_the_reference(report, reference, layer):
    """eval's KL is the top-20 estimate (sae_quality.kl_top_k) of the server's distributions;
    the reference applies the same estimate to its own full distributions, and the exact KL
    bounds it: on this circuit splicing moves most of the mass (exact KL ~ 20-35 nats), which
    the top-20 lists cannot see, so the estimate is well below it (documented in docs/eval.md)."""
    from steerserve.analysis.sae_quality import kl_top_k

    _, data = report
    estimates, exact = [], []
    for text in TEXTS:
        ids = reference.tokenizer.encode(text)
        p, q = reference_logprobs(reference, ids, None), reference_logprobs(reference, ids, layer)
        exact.extend((p.exp() * (p - q)).sum(-1).tolist())
        estimates.extend(kl_top_k(listed(p[i], ids[i + 1]), listed(q[i], ids[i + 1]), 20) for i in range(len(ids) - 1))
    estimate, exact_kl = sum(estimates) / len(estimates), sum(exact) / len(exact)
    assert estimate > 1.0  # splicing changes the distributions, so the comparison is not vacuous
    # bf16 server against float32 reference: which tokens make a top-20 list differs a little,
    # and the estimate gives an unlisted token the list's 20th value, so it moves more than NLL
    assert data["sae_quality"][str(layer)]["splice_kl"] == pytest.approx(estimate, rel=0.25)
    assert data["sae_quality"][str(layer)]["splice_kl"] <= exact_kl


def test_kl_top_k_is_exact_when_the_lists_hold_the_mass():
    from steerserve.analysis.sae_quality import kl_top_k

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.log_softmax(torch.randn(50, generator=g) * 6, -1)
        q = torch.log_softmax(p + torch.randn(50, generator=g), -1)
        exact = float((p.exp() * (p - q)).sum())
        top = lambda lp: {str(i): float(lp[i]) for i in lp.topk(30).indices.tolist()}  # noqa: E731
        assert kl_top_k(top(p), top(q), 30) == pytest.approx(exact, rel=0.02, abs=1e-3)
