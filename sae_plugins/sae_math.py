"""SAE math for steering, in plain PyTorch: encode, and the edit a steering table asks for.

Only the features a request touches are decoded: for the clamp family the edit is
`x += sum_i (target_i - f_i(x)) * d_i`, which keeps the SAE's reconstruction error intact,
and `add` needs no encode at all. For TopK SAEs f_i still depends on the k-th largest
pre-activation, so rows that need an encode get the full pre-activation.
"""

from __future__ import annotations

import torch

from .sae import SAEWeights

# Mode codes in the per-slot tables (0 = empty entry).
MODE_NONE, MODE_ADD, MODE_CLAMP, MODE_SCALE = 0, 1, 2, 3
MODE_CODES = {"add": MODE_ADD, "clamp": MODE_CLAMP, "ablate": MODE_CLAMP, "scale": MODE_SCALE}


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


def steering_delta(
    sae: SAEWeights,
    x: torch.Tensor,  # [rows, d_model] residual stream (float or model dtype)
    feature_ids: torch.Tensor,  # [rows, F] int64
    modes: torch.Tensor,  # [rows, F] int8 mode codes
    values: torch.Tensor,  # [rows, F] float32 (target for clamp, factor for scale)
) -> torch.Tensor:
    """The residual edit [rows, d_model] (float32) for per-row feature tables."""
    coef = torch.where(modes == MODE_ADD, values, torch.zeros_like(values))
    needs_encode = ((modes == MODE_CLAMP) | (modes == MODE_SCALE)).any(dim=-1)
    encode_rows = needs_encode.nonzero().squeeze(-1)
    if encode_rows.numel() > 0:
        f = encode(sae, x[encode_rows]).gather(-1, feature_ids[encode_rows])
        m, v = modes[encode_rows], values[encode_rows]
        c = torch.where(m == MODE_CLAMP, v - f, torch.where(m == MODE_SCALE, (v - 1.0) * f, coef[encode_rows]))
        coef = coef.index_copy(0, encode_rows, c)
    directions = sae.W_dec[feature_ids].float()  # [rows, F, d_model]
    return torch.einsum("rf,rfd->rd", coef, directions)
