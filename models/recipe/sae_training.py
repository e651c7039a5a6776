"""Train TopK SAEs on the default model's residual stream and save them in the Qwen-Scope format.

Qwen-Scope's definition (REFERENCE.md section 1): `f = TopK_k(ReLU(x @ W_enc.T + b_enc))`,
`x_hat = f @ W_dec.T + b_dec`, x the stream after decoder layer n (`resid_post`). Training follows
the usual TopK recipe: MSE loss, unit-norm decoder columns, an auxiliary loss that lets dead
features learn from the residual error, and b_dec started at the activations' mean.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steerserve_sae.sae.activations import TopK

from models.recipe.corpus import Document
from models.recipe.qwen35_checkpoint import save_qwen_scope_config, save_qwen_scope_layer

SAE_LAYERS = (1, 2, 3)  # language is mostly assembled by the full-attention layer 3


@dataclass(frozen=True)
class SaeSettings:
    d_sae: int = 1024  # 2048 split Italian over several features (issue #13)
    k: int = 32
    steps: int = 2000
    batch_tokens: int = 2048
    lr: float = 1e-3
    aux_k: int = 256  # latents the auxiliary loss uses among the dead ones
    aux_weight: float = 1 / 32
    dead_after_tokens: int = 200_000  # a latent silent this long counts as dead
    activation_tokens: int = 600_000
    seed: int = 0


def load_model(model_dir: Path):
    """The served checkpoint (bf16 weights) in float32 for measuring activations."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def residual_streams(model, stream: torch.Tensor, layers: tuple[int, ...], seq_len: int = 256,
                     max_tokens: int | None = None) -> dict[int, torch.Tensor]:
    """resid_post at each layer for consecutive windows of the token stream, [tokens, d_model]."""
    usable = (len(stream) if max_tokens is None else min(len(stream), max_tokens)) // seq_len * seq_len
    windows = stream[:usable].view(-1, seq_len)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook(layer):
        def record(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer].append(hidden.detach().reshape(-1, hidden.shape[-1]).clone())
        return record

    handles = [model.model.layers[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            for batch in windows.split(16):
                model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}


def encode(sae: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """Feature activations as the server computes them (steerserve_sae.sae.activations.TopK)."""
    return TopK(k).dense(x @ sae["W_enc"].T + sae["b_enc"])


def quality(sae: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    """Fraction of variance unexplained, L0 and the share of features that never fired on x
    (one encode, chunked)."""
    err = total = 0.0
    active = 0
    fired = torch.zeros(sae["W_enc"].shape[0], dtype=torch.bool)
    mean = x.mean(0)
    with torch.no_grad():
        for chunk in x.split(8192):
            f = encode(sae, chunk, k)
            x_hat = f @ sae["W_dec"].T + sae["b_dec"]
            err += float(((chunk - x_hat) ** 2).sum())
            total += float(((chunk - mean) ** 2).sum())
            active += int((f > 0).sum())
            fired |= (f > 0).any(0)
    return {"held_out_fvu": round(err / total, 4), "l0": round(active / len(x), 2),
            "dead_fraction": round(float((~fired).float().mean()), 4)}


def train_sae(x: torch.Tensor, settings: SaeSettings, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """One TopK SAE on activations x [tokens, d_model]; returns Qwen-Scope tensors (fp32)."""
    g = torch.Generator().manual_seed(settings.seed)
    d_model = x.shape[1]
    scale = float(x.sub(x.mean(0)).norm(dim=1).mean())
    w_dec = torch.randn(d_model, settings.d_sae, generator=g)
    w_dec /= w_dec.norm(dim=0, keepdim=True)
    params = {
        "W_dec": w_dec.clone().requires_grad_(),
        "W_enc": w_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(settings.d_sae, requires_grad=True),
        "b_dec": x.mean(0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=settings.lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(settings.d_sae, dtype=torch.long)
    seen = 0
    for step in range(settings.steps):
        idx = torch.randint(0, len(x), (settings.batch_tokens,), generator=g)
        batch = x[idx]
        pre = batch @ params["W_enc"].T + params["b_enc"]
        f = TopK(settings.k).dense(pre)
        x_hat = f @ params["W_dec"].T + params["b_dec"]
        err = batch - x_hat
        loss = err.pow(2).sum(-1).mean() / scale**2
        seen += len(batch)
        last_fired[(f > 0).any(dim=0)] = seen
        dead = (seen - last_fired) > settings.dead_after_tokens
        if dead.any():  # AuxK: dead latents reconstruct the residual error
            f_aux = TopK(min(settings.aux_k, int(dead.sum()))).dense(pre.masked_fill(~dead, 0.0))
            aux_err = err.detach() - f_aux @ params["W_dec"].T
            loss = loss + settings.aux_weight * aux_err.pow(2).sum(-1).mean() / scale**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder columns unit-norm: remove the radial gradient
            w = params["W_dec"]
            w.grad -= (w.grad * w).sum(0, keepdim=True) * w
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=0, keepdim=True)
        if step % 500 == 0 or step == settings.steps - 1:
            log(f"  step {step}/{settings.steps} normalized mse {float(err.detach().pow(2).sum(-1).mean()) / scale**2:.4f} "
                f"dead {int(dead.sum())}")
    return {name: p.detach().contiguous() for name, p in params.items()}


def train_saes(model_dir: Path, docs: list[Document], log: Callable[[str], None],
               settings: SaeSettings = SaeSettings()) -> dict:
    """SAEs at SAE_LAYERS into model_dir/sae; returns per-layer FVU, L0 and dead fraction on
    held-out text."""
    from tokenizers import Tokenizer

    from models.recipe import language_model

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    lm_settings = language_model.TrainSettings()
    train_stream = language_model.token_stream([d for d in docs if not d.held_out], tok, lm_settings)
    held_stream = language_model.token_stream([d for d in docs if d.held_out], tok, lm_settings)
    model = load_model(model_dir)
    started = time.monotonic()
    # a seeded sample of windows from the whole training stream, not just its start
    g = torch.Generator().manual_seed(settings.seed)
    n_windows = settings.activation_tokens // 256
    starts = torch.randperm(len(train_stream) // 256, generator=g)[:n_windows] * 256
    sample = torch.cat([train_stream[s:s + 256] for s in starts.tolist()])
    acts = residual_streams(model, sample, SAE_LAYERS)
    held = residual_streams(model, held_stream, SAE_LAYERS, max_tokens=100_000)
    log(f"activations: {len(sample)} tokens at layers {list(SAE_LAYERS)} ({time.monotonic() - started:.0f} s)")
    sae_dir = model_dir / "sae"
    shutil.rmtree(sae_dir, ignore_errors=True)  # no layer file of an older build survives
    sae_dir.mkdir()
    report = {"settings": asdict(settings), "layers": {}}
    for layer in SAE_LAYERS:
        log(f"SAE at layer {layer}")
        sae = train_sae(acts[layer], settings, log)
        save_qwen_scope_layer(sae_dir, layer, sae)
        report["layers"][str(layer)] = quality(sae, held[layer], settings.k)
        log(f"  layer {layer}: {report['layers'][str(layer)]}")
    save_qwen_scope_config(sae_dir, base_model=model_dir.name, d_model=acts[SAE_LAYERS[0]].shape[1],
                           d_sae=settings.d_sae, k=settings.k, num_layers=model.config.num_hidden_layers)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report
