"""SAE math for steering, in plain PyTorch: encode, and the edit a steering table asks for.

Only the features a request touches are decoded: for the clamp family the edit is
`x += sum_i (target_i - f_i(x)) * d_i`, which keeps the SAE's reconstruction error intact,
and an ungated `add` needs no encode at all. For TopK SAEs f_i still depends on the k-th largest
pre-activation, so rows that need an encode get the full pre-activation.
"""

from __future__ import annotations

import torch

from steerserve_sae.sae.autoencoder import SAEWeights

# The clamp family as one affine rule on the feature's activation f: the edit's coefficient on
# d_i is `offset + gain * f`. clamp (and ablate, clamp to 0): target - f; scale by s: (s - 1) * f.
# An empty table entry is (0, 0). An ungated `add` has no entry: it needs no encode and is folded
# into one precomputed vector per config (see add_vector); a gated one is (value, 0).
def edit_coefficients(mode: str, value: float) -> tuple[float, float]:
    """(offset, gain) of an encoded edit; coefficient on d_i = offset + gain * f_i."""
    if mode in ("clamp", "ablate"):
        return (0.0 if mode == "ablate" else value), -1.0
    if mode == "scale":
        return 0.0, value - 1.0
    if mode == "add":  # only gated adds go through the table: value whatever f is
        return value, 0.0
    raise ValueError(f"unknown mode {mode!r}")


def pre_activation(sae: SAEWeights, x: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations [rows, d_sae] in the encoder's compute dtype (one fused matmul +
    bias) of residual-stream rows x [rows, d_model]."""
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    W_enc, b_enc = sae.encoder()
    return torch.addmm(b_enc, x.to(W_enc.dtype), W_enc.T)


def encode(sae: SAEWeights, x: torch.Tensor) -> torch.Tensor:
    """Dense feature activations [rows, d_sae] (float32) of residual-stream rows x [rows, d_model]."""
    return sae.activation_fn.dense(pre_activation(sae, x))


def decode(sae: SAEWeights, features: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction x_hat = f @ W_dec + b_dec (float32 [rows, d_model]), from the
    decoder rows of the features active on some row only (at 27B shapes a float32 copy of the
    whole decoder would be 1.6 GB per call)."""
    used = features.any(dim=0).nonzero().flatten()
    return torch.addmm(sae.b_dec.float(), features[:, used].float(), sae.W_dec[used].float())


def feature_activations(sae: SAEWeights, x: torch.Tensor, feature_ids: torch.Tensor) -> torch.Tensor:
    """Activations [rows, F] of only the features `feature_ids` [rows, F], equal to
    `encode(sae, x).gather(-1, feature_ids)`: the same definition (activations.py), with only
    [rows, F] widened to float32 and nothing decoded."""
    return sae.activation_fn.gather(pre_activation(sae, x), feature_ids)


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
    offset: torch.Tensor,  # [rows, F] float32 (see edit_coefficients; 0 for padding)
    gain: torch.Tensor,  # [rows, F] float32 (0 for padding)
) -> torch.Tensor:
    """The clamp/scale edit [rows, d_model] (float32); decodes only the touched features."""
    return decode_edits(sae, feature_ids, torch.addcmul(offset, gain, feature_activations(sae, x, feature_ids)))


def decode_edits(sae: SAEWeights, feature_ids: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef[:, i] * d_{feature_ids[:, i]}: [rows, d_model] float32 from [rows, F] ids and
    coefficients."""
    return torch.bmm(coef.unsqueeze(1), sae.W_dec[feature_ids].float()).squeeze(1)
