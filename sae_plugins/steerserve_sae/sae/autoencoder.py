"""One sparse autoencoder in the orientation the steering math wants.

Every supported file format (Qwen-Scope, SAELens, EleutherAI sparsify) is converted into this
one shape at load time, so the math in `sae_math.py` never branches on where a file came from.
Feature i's decoder direction is ROW i of `W_dec` here (Qwen-Scope files store it as a column;
the loader transposes once so a gather of a few features reads contiguous memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from steerserve_sae.sae.activations import Activation, activation_of

ActivationKind = Literal["topk", "relu", "jumprelu"]

SMALL_ENCODER_BYTES = 4 << 20  # float32 encoders up to this size stay cache-resident on CPU


@dataclass
class SAEWeights:
    layer: int
    W_enc: torch.Tensor  # [d_sae, d_model]; pre-activation = x @ W_enc.T + b_enc
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_model]; row i = feature i's direction
    b_dec: torch.Tensor  # [d_model]
    activation: ActivationKind
    k: int | None  # TopK only
    threshold: torch.Tensor | None  # [d_sae], JumpReLU only
    apply_b_dec_to_input: bool  # subtract b_dec before encoding (SAELens option, sparsify)
    architecture: str  # human-readable, e.g. "qwen-scope/topk", "saelens/jumprelu"
    source: str  # path of the file the weights came from
    hook_point: str = "resid_post"
    # The encoder in the dtype the encode runs in, when that differs from the stored one (see
    # choose_cpu_encoder); None = use W_enc / b_enc as stored.
    encoder_compute: tuple[torch.Tensor, torch.Tensor] | None = None
    # The float32 encoder packed for the native CPU kernel (see pack_encoder_panels); None = not.
    encoder_panels: torch.Tensor | None = None

    @property
    def activation_fn(self) -> Activation:
        """The activation as defined once for every path (activations.py)."""
        return activation_of(self.activation, k=self.k, threshold=self.threshold)

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc, b_enc) as the encode multiplies with them."""
        return self.encoder_compute or (self.W_enc, self.b_enc)

    def use_float32_encoder(self) -> None:
        """Encode with a float32 copy of the (already rounded) encoder; costs the copy's memory."""
        if self.W_enc.dtype != torch.float32:
            self.encoder_compute = (self.W_enc.float(), self.b_enc.float())

    def choose_cpu_encoder(self) -> None:
        """On CPU, encode a small SAE in float32 and leave a large one in its stored dtype.
        Without native bf16 matrix units PyTorch's bf16 GEMM of a few rows is compute-bound
        and slow (one row against a 1024 x 128 encoder: 55 us bf16, 13 us float32 here), but
        once the encoder outgrows the caches the encode is memory-bound and float32 doubles the
        bytes read (at 1/8 of the 27B SAE, 10240 x 640, float32 was 2.3-3.7x slower)."""
        if self.W_enc.numel() * 4 <= SMALL_ENCODER_BYTES:
            self.use_float32_encoder()

    def pack_encoder_panels(self) -> None:
        """Pack a small float32 encoder as panels [d_sae / 16, d_model, 16] (16 features' weights
        per input dim, contiguous) for the native CPU kernel's register-tiled encode, which reads
        them sequentially; a plain transposed layout puts each input dim's 16 weights a full
        d_sae apart and thrashes the cache sets. Costs one more copy of the encoder."""
        W_enc, _ = self.encoder()
        if W_enc.dtype == torch.float32 and self.d_sae % 16 == 0 and W_enc.numel() * 4 <= SMALL_ENCODER_BYTES:
            self.encoder_panels = W_enc.reshape(self.d_sae // 16, 16, self.d_model).transpose(1, 2).contiguous()

    def nbytes(self) -> int:
        tensors = [self.W_enc, self.b_enc, self.W_dec, self.b_dec, *(self.encoder_compute or ())]
        for extra in (self.threshold, self.encoder_panels):
            if extra is not None:
                tensors.append(extra)
        return sum(t.numel() * t.element_size() for t in tensors)

    def info(self) -> dict:
        """What `GET /v1/saes` reports for this layer (JSON-safe)."""
        return {
            "layer": self.layer,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "k": self.k,
            "architecture": self.architecture,
            "hook_point": self.hook_point,
            "dtype": str(self.dtype).removeprefix("torch."),
            "source": self.source,
            "memory_bytes": self.nbytes(),
        }
