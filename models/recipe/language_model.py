"""Train the default model: a small Qwen3.5 (the 27B's architecture: Gated DeltaNet layers plus a
gated full-attention layer) from scratch on the fortune corpus, with Hugging Face transformers.

Training data is a stream of documents separated by `<|endoftext|>`. A share of them is wrapped
as a ChatML exchange whose user turn asks, in the document's language, for a saying, so that
chat completions answer with a fortune (in the language asked) and plain completions continue
text.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable

import torch

from models.recipe.corpus import Document

CHAT_PROMPTS = {
    "en": ("Tell me something.", "Say something wise.", "Tell me a joke.", "Give me a quote."),
    "de": ("Erzähl mir etwas.", "Sag etwas Kluges.", "Erzähl mir einen Witz.", "Gib mir ein Zitat."),
    "es": ("Cuéntame algo.", "Di algo sabio.", "Cuéntame un chiste.", "Dame una cita."),
    "it": ("Dimmi qualcosa.", "Di' qualcosa di saggio.", "Raccontami una barzelletta.", "Dammi una citazione."),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    full_attention_interval: int = 4  # layers 0..2 Gated DeltaNet, layer 3 full attention
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    linear_key_heads: int = 2
    linear_value_heads: int = 4
    linear_head_dim: int = 64
    conv_kernel: int = 4
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    max_positions: int = 2048


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1300
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    chat_share: float = 0.4  # documents wrapped as a ChatML exchange
    seed: int = 0


def new_model(config: dict, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    return model


def document_text(doc: Document, rng: random.Random, chat_share: float) -> str:
    """The document as the model sees it in training: plain, or as a ChatML exchange."""
    if rng.random() < chat_share:
        prompt = rng.choice(CHAT_PROMPTS[doc.language])
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{doc.text}<|im_end|>\n"
    return doc.text


def token_stream(docs: list[Document], tok, settings: TrainSettings) -> torch.Tensor:
    """One long tensor of token ids: documents shuffled (seeded), each ended by <|endoftext|>."""
    rng = random.Random(settings.seed)
    order = list(docs)
    rng.shuffle(order)
    eot = tok.token_to_id("<|endoftext|>")
    texts = [document_text(d, rng, settings.chat_share) for d in order]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def mean_loss(model, stream: torch.Tensor, seq_len: int, max_tokens: int = 200_000) -> float:
    """Mean next-token cross-entropy (nats) over consecutive windows of the stream."""
    model.eval()
    total, count = 0.0, 0
    usable = min(len(stream), max_tokens) // seq_len * seq_len
    windows = stream[:usable].view(-1, seq_len)
    with torch.no_grad():
        for batch in windows.split(16):
            out = model(input_ids=batch, labels=batch)
            n = batch.numel() - batch.shape[0]
            total += float(out.loss) * n
            count += n
    model.train()
    return total / count


def unigram_loss(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of held-out tokens under add-one-smoothed training token frequencies."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[held_out].mean())


def train(model, stream: torch.Tensor, settings: TrainSettings,
          progress: Callable[[int, float, float], None] | None = None) -> None:
    """AdamW with linear warm-up and cosine decay over random windows of the stream (seeded)."""
    g = torch.Generator().manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    model.train()
    start = time.monotonic()
    for step in range(settings.steps):
        lr = settings.lr * min(1.0, (step + 1) / settings.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / settings.steps)) * 0.9 + 0.1
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(stream) - settings.seq_len, (settings.batch_size,), generator=g)
        batch = torch.stack([stream[o:o + settings.seq_len] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, float(loss), time.monotonic() - start)
