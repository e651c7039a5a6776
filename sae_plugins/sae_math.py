"""SAE math for steering, in plain PyTorch: encode, and the edit a steering table asks for.

Only the features a request touches are decoded: for the clamp family the edit is
`x += sum_i (target_i - f_i(x)) * d_i`, which keeps the SAE's reconstruction error intact,
and `add` needs no encode at all. For TopK SAEs f_i still depends on the k-th largest
pre-activation, so rows that need an encode get the full pre-activation.
"""

from __future__ import annotations

import torch

from .sae import SAEWeights

# Mode codes in the per-slot encode tables (0 = empty entry). `add` has no code: it never
# needs an encode and is folded into one precomputed vector per config (see add_vector).
MODE_NONE, MODE_CLAMP, MODE_SCALE = 0, 1, 2
ENCODE_MODE_CODES = {"clamp": MODE_CLAMP, "ablate": MODE_CLAMP, "scale": MODE_SCALE}


def encode(sae: SAEWeights, x: torch.Tensor) -> torch.Tensor:
    """Dense feature activations [rows, d_sae] of residual-stream rows x [rows, d_model]."""
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x.to(sae.W_enc.dtype) @ sae.W_enc.T + sae.b_enc
    pre = pre.float()
    if sae.activation == "jumprelu":
        assert sae.threshold is not None
        return pre * (pre > sae.threshold.float())
    acts = torch.relu(pre)
    if sae.activation == "topk":
        assert sae.k is not None
        values, indices = acts.topk(sae.k, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter_(-1, indices, values)
    return acts


def add_vector(sae: SAEWeights, feature_ids: list[int], values: list[float]) -> torch.Tensor:
    """The `add` edit of one config at one layer: sum_i value_i * d_i (float32 [d_model]).

    It does not depend on the token, so it is computed once when a config is installed."""
    ids = torch.tensor(feature_ids, dtype=torch.long, device=sae.W_dec.device)
    coef = torch.tensor(values, dtype=torch.float32, device=sae.W_dec.device)
    return coef @ sae.W_dec[ids].float()


def encoded_delta(
    sae: SAEWeights,
    x: torch.Tensor,  # [rows, d_model] residual stream
    feature_ids: torch.Tensor,  # [rows, F] int64
    modes: torch.Tensor,  # [rows, F] int8: MODE_CLAMP, MODE_SCALE or MODE_NONE (padding)
    values: torch.Tensor,  # [rows, F] float32: clamp target or scale factor
) -> torch.Tensor:
    """The clamp/scale edit [rows, d_model] (float32); decodes only the touched features."""
    f = encode(sae, x).gather(-1, feature_ids)
    coef = torch.where(
        modes == MODE_CLAMP, values - f, torch.where(modes == MODE_SCALE, (values - 1.0) * f, torch.zeros_like(f))
    )
    return torch.einsum("rf,rfd->rd", coef, sae.W_dec[feature_ids].float())
