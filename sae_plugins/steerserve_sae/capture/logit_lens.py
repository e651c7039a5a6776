"""What a feature writes: its decoder direction read through the model's final norm and
unembedding (the "logit lens"), computed in the worker with the model's own modules.

`feature_report` runs the direction through the final RMSNorm and `compute_logits` (which
gathers vocab-parallel shards, so it is right under tensor parallelism). `token_scores` ranks
all features of a layer by how much they promote one token: with RMSNorm
`y = x / rms(x) * w_eff`, the token's logit is `(W_dec_i / rms(W_dec_i)) . (w_eff * u_t)`, one
matrix-vector product per layer; the rank that holds token t's unembedding row answers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from steerserve_sae.protocol.rpc import FeatureReport, TokenFeatures
from steerserve_sae.vllm_hooks.architectures import Architecture
from steerserve_sae.sae.autoencoder import SAEWeights


class FeatureLens:
    def __init__(self, model: nn.Module, architecture: Architecture, saes: dict[int, SAEWeights]):
        self.model = model
        self.saes = saes
        self.final_norm = architecture.final_norm_of(model)
        self.lm_head = architecture.lm_head_of(model)
        self._inverse_rms: dict[int, torch.Tensor] = {}  # per layer, computed once

    @torch.inference_mode()
    def feature_report(self, layer: int, index: int, top_n: int) -> FeatureReport | None:
        sae = self.saes[layer]
        direction = sae.W_dec[index]
        logits = self.model.compute_logits(self.final_norm(direction[None].to(self._dtype()))[0][None])
        if logits is None:  # only the gathering rank holds full logits
            return None
        logits = logits[0].float()
        promoted = logits.topk(top_n)
        suppressed = (-logits).topk(top_n)
        encoder = sae.W_enc[index].float()
        decoder = direction.float()
        return {
            "decoder_norm": float(decoder.norm()),
            "encoder_norm": float(encoder.norm()),
            "encoder_decoder_cosine": float(torch.nn.functional.cosine_similarity(encoder, decoder, dim=0)),
            "promoted": [[int(t), float(v)] for t, v in zip(promoted.indices, promoted.values)],
            "suppressed": [[int(t), float(-v)] for t, v in zip(suppressed.indices, suppressed.values)],
        }

    @torch.inference_mode()
    def token_scores(self, token_id: int, layers: list[int], top_n: int) -> TokenFeatures | None:
        row = self._unembedding_row(token_id)
        if row is None:
            return None
        w_eff = self._norm_weight()
        result = {}
        for layer in layers:
            sae = self.saes[layer]
            if layer not in self._inverse_rms:
                self._inverse_rms[layer] = sae.W_dec.float().pow(2).mean(-1).add(self._eps()).rsqrt()
            scores = (sae.W_dec.float() @ (w_eff * row)) * self._inverse_rms[layer]
            top = scores.topk(min(top_n, scores.numel()))
            result[layer] = [[int(i), float(v)] for i, v in zip(top.indices, top.values)]
        return result

    def _unembedding_row(self, token_id: int) -> torch.Tensor | None:
        shard = getattr(self.lm_head, "shard_indices", None)
        start = shard.org_vocab_start_index if shard is not None else 0
        end = shard.org_vocab_end_index if shard is not None else self.lm_head.weight.shape[0]
        if not start <= token_id < end:
            return None
        return self.lm_head.weight[token_id - start].float()

    def _norm_weight(self) -> torch.Tensor:
        """w_eff of the final RMSNorm, read off the module itself (plain or (1 + w) form)."""
        ones = torch.ones(1, self.lm_head.weight.shape[1], dtype=self._dtype(), device=self.lm_head.weight.device)
        return self.final_norm(ones)[0].float() * math.sqrt(1.0 + self._eps())

    def _eps(self) -> float:
        return float(getattr(self.final_norm, "variance_epsilon", getattr(self.final_norm, "eps", 1e-6)))

    def _dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

