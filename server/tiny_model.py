"""Build a tiny random Qwen3.5 text model, tokenizer and Qwen-Scope-format SAE set locally.

No model hub is reachable from development or CI machines, so tests need a checkpoint they can
build in seconds that still exercises the real code paths: the same architecture class vLLM
serves for Qwen3.5 (hybrid Gated DeltaNet + full attention), a real ChatML tokenizer, and SAE
files in the exact published Qwen-Scope layout.

Everything is generated from explicit `torch.Generator`s seeded from `seed`, so one seed gives
the same bytes on every machine, independent of Hugging Face's init order.

Numerics. Tests compare vLLM's CPU kernels to a plain Hugging Face reference token by token, so
greedy decoding must not hinge on near-ties. A default random init gives almost flat logits.
Here the unembedding is made to *read* the residual stream along a few strong directions
(see `_lm_head`), which gives top-1 / top-2 margins of several logits while the choice still
depends on the context (the attention layers write into those directions) and reacts to
residual-stream edits of a few units.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TinySettings", "SETTINGS", "build_tiny_model", "is_built"]

MARKER = ".tiny_model_complete"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Same pre-tokenizer as the real Qwen3.5 tokenizer, so `Qwen3_5Tokenizer` (which transformers
# picks for model_type qwen3_5_text) and the raw tokenizer.json agree byte for byte.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CORPUS = """\
The river starts high in the mountains, where snow melts slowly in the spring. Small streams
join together and run down through the forest, past old stone bridges and quiet villages.
By the time the water reaches the city it is wide and brown, carrying boats, leaves and the
stories of everyone who lives along its banks.

Maria opened the small bakery at six o'clock every morning. She made bread, sweet rolls and a
dark cake with apples and honey. People came from the station, from the school and from the
hospital across the street. "Good morning," she said to each of them, and most of them smiled
back. On rainy days she gave the children a free cookie.

A computer program is a list of instructions. The machine reads each instruction, changes a
number in its memory, and moves on to the next one. Simple steps, repeated millions of times a
second, can draw pictures, translate languages, play music or answer questions. Good programs
are written for people to read first and for machines to run second.

What is the weather like today? It is cold and windy, with grey clouds over the hills. The
forecast says it will rain tonight and snow tomorrow. Remember to wear a warm coat, a hat and
gloves. Would you like a cup of tea before you go outside?

The history of science is full of surprises. Scientists once believed that the sun moved around
the earth, that light needed air to travel, and that heavy objects always fell faster than light
ones. Careful experiments and new measurements changed these ideas. Today we know that the
earth moves around the sun, that light crosses empty space, and that a feather and a hammer fall
together when there is no air.

Please write a short poem about the sea. The sea is blue and deep and old; it keeps its secrets,
green and gold. The waves come in, the waves go out, and gulls above them turn about.

Here are three tips for learning a new language: listen every day, speak without fear of
mistakes, and read simple books that you enjoy. After a few months you will notice that you
understand much more than before. Numbers help too: one, two, three, four, five, six, seven,
eight, nine, ten, twenty, fifty, one hundred, 2024, 3.14 and 42.

The cat sat on the warm window and watched the birds in the garden. A dog barked far away. The
old man in the house next door was reading a newspaper and drinking coffee. His wife was
planting flowers: red roses, yellow tulips and small white daisies. It was a calm and happy
afternoon, and nobody was in a hurry.

Question: How many legs does a spider have? Answer: A spider has eight legs. Question: Why is the
sky blue? Answer: Sunlight is scattered by the air, and blue light is scattered the most.
Thank you for your help! You are welcome; I am happy to explain anything else you want to know.
"""


@dataclass(frozen=True)
class TinySettings:
    """Shape and init scales of the tiny model (shapes from REFERENCE.md section 4)."""

    vocab_size: int = 1024  # tokenizer is trained to exactly this size
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    full_attention_interval: int = 4  # layer 3 is full attention, 0..2 Gated DeltaNet
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 64
    linear_key_heads: int = 1
    linear_value_heads: int = 2
    linear_head_dim: int = 128
    conv_kernel: int = 4
    # init scales
    embed_std: float = 1.0  # residual stream RMS ~1 per dim, norm ~sqrt(hidden)
    proj_gain: float = 1.0  # linear weights ~ gain / sqrt(fan_in)
    out_gain: float = 1.0  # gain of the projections that write into the residual stream
    lm_head_std: float = 0.5
    lm_head_bigram: float = 0.0  # weight of the permuted-embedding (next-token) component
    # SAE
    d_sae: int = 1024
    sae_k: int = 16
    sae_enc_scale: float = 1.0
    sae_enc_noise: float = 0.02
    sae_b_enc: float = -0.5


SETTINGS = TinySettings()


def is_built(out_dir: str | Path) -> bool:
    """True when a previous build finished (the marker is written last)."""
    return (Path(out_dir) / MARKER).is_file()


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write model, tokenizer and SAE files into `out_dir` (idempotent unless `force`)."""
    out = Path(out_dir)
    if is_built(out) and not force:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s = SETTINGS
    tokenizer = _train_tokenizer(s.vocab_size)
    _save_tokenizer(tokenizer, out)
    config = _model_config(s, tokenizer)
    state = _model_weights(s, seed)
    _save_model(config, state, out)
    _save_saes(s, state, out, seed)
    (out / MARKER).write_text(json.dumps({"seed": seed}) + "\n")
    return out


# ----------------------------------------------------------------------------- tokenizer


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on CORPUS; special tokens take ids 0..2."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens > {vocab_size}")
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json plus a Qwen-style tokenizer_config.json with the ChatML template."""
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen3_5Tokenizer",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------- model


def _model_config(s: TinySettings, tok) -> dict:
    """HF config.json for a text-only Qwen3.5 (what vLLM serves as Qwen3_5ForCausalLM)."""
    layer_types = [
        "full_attention" if (i + 1) % s.full_attention_interval == 0 else "linear_attention"
        for i in range(s.num_layers)
    ]
    return {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": layer_types,
        "full_attention_interval": s.full_attention_interval,
        "linear_conv_kernel_dim": s.conv_kernel,
        "linear_key_head_dim": s.linear_head_dim,
        "linear_value_head_dim": s.linear_head_dim,
        "linear_num_key_heads": s.linear_key_heads,
        "linear_num_value_heads": s.linear_value_heads,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
        },
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "dtype": "bfloat16",
        "use_cache": True,
    }


def _param_shapes(s: TinySettings) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint, by name (mirrors modeling_qwen3_5)."""
    d, m = s.hidden_size, s.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (s.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (s.vocab_size, d),
    }
    key_dim = s.linear_key_heads * s.linear_head_dim
    value_dim = s.linear_value_heads * s.linear_head_dim
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (m, d)
        shapes[p + "mlp.up_proj.weight"] = (m, d)
        shapes[p + "mlp.down_proj.weight"] = (d, m)
        if (i + 1) % s.full_attention_interval == 0:
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = (s.num_heads * s.head_dim * 2, d)  # query + output gate
            shapes[a + "k_proj.weight"] = (s.num_kv_heads * s.head_dim, d)
            shapes[a + "v_proj.weight"] = (s.num_kv_heads * s.head_dim, d)
            shapes[a + "o_proj.weight"] = (d, s.num_heads * s.head_dim)
            shapes[a + "q_norm.weight"] = (s.head_dim,)
            shapes[a + "k_norm.weight"] = (s.head_dim,)
        else:
            a = p + "linear_attn."
            shapes[a + "in_proj_qkv.weight"] = (2 * key_dim + value_dim, d)
            shapes[a + "in_proj_z.weight"] = (value_dim, d)
            shapes[a + "in_proj_b.weight"] = (s.linear_value_heads, d)
            shapes[a + "in_proj_a.weight"] = (s.linear_value_heads, d)
            shapes[a + "conv1d.weight"] = (2 * key_dim + value_dim, 1, s.conv_kernel)
            shapes[a + "dt_bias"] = (s.linear_value_heads,)
            shapes[a + "A_log"] = (s.linear_value_heads,)
            shapes[a + "norm.weight"] = (s.linear_head_dim,)
            shapes[a + "out_proj.weight"] = (d, value_dim)
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], s: TinySettings, g: torch.Generator) -> torch.Tensor:
    """One tensor's init; the rule depends only on its name, so the order never matters."""
    if name.endswith("linear_attn.norm.weight"):
        return torch.ones(shape)  # gated RMSNorm multiplies by weight (not 1 + weight)
    if "norm" in name:
        return torch.zeros(shape)  # Qwen3.5 RMSNorm is zero-centred: scale = 1 + weight
    if name.endswith("dt_bias"):
        return torch.ones(shape)
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 8.0, generator=g).log()
    if name.endswith("conv1d.weight"):
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=g) * s.embed_std
    if name == "lm_head.weight":
        return torch.randn(shape, generator=g) * s.lm_head_std
    gain = s.out_gain if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")) else s.proj_gain
    return torch.randn(shape, generator=g) * (gain / math.sqrt(shape[-1]))


def _model_weights(s: TinySettings, seed: int) -> dict[str, torch.Tensor]:
    """All checkpoint tensors in bfloat16; each tensor gets its own generator seeded by name."""
    state = {}
    for name, shape in _param_shapes(s).items():
        g = torch.Generator().manual_seed(_name_seed(seed, name))
        state[name] = _init_tensor(name, shape, s, g)
    perm = torch.randperm(s.vocab_size, generator=torch.Generator().manual_seed(_name_seed(seed, "perm")))
    state["lm_head.weight"] += s.lm_head_bigram * s.lm_head_std / s.embed_std * state["model.embed_tokens.weight"][perm]
    _silence_special_tokens(state["lm_head.weight"])
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def _silence_special_tokens(lm_head: torch.Tensor) -> None:
    """Zero logits for ChatML specials so greedy runs always produce max_tokens tokens."""
    lm_head[: len(SPECIAL_TOKENS)] = 0.0


def _name_seed(seed: int, name: str) -> int:
    """Stable per-tensor seed (Python's hash() is salted per process, so not usable)."""
    h = 1469598103934665603
    for byte in f"{seed}:{name}".encode():
        h = ((h ^ byte) * 1099511628211) % (1 << 63)
    return h


def _save_model(config: dict, state: dict[str, torch.Tensor], out: Path) -> None:
    """config.json, generation_config.json and model.safetensors."""
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "eos_token_id": [config["eos_token_id"], config["pad_token_id"]],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- SAEs


def _save_saes(s: TinySettings, state: dict[str, torch.Tensor], out: Path, seed: int) -> None:
    """Qwen-Scope layout: sae/layer{n}.sae.pt (fp32 dicts) plus sae/config.json."""
    sae_dir = out / "sae"
    sae_dir.mkdir()
    for layer in range(s.num_layers):
        g = torch.Generator().manual_seed(_name_seed(seed, f"sae.{layer}"))
        torch.save(_sae_tensors(s, g), sae_dir / f"layer{layer}.sae.pt")
    config = {
        "model_type": "topk_sae",
        "base_model": out.name,
        "d_model": s.hidden_size,
        "d_sae": s.d_sae,
        "k": s.sae_k,
        "num_layers": s.num_layers,
        "hook_point": "resid_post",
        "dtype": "float32",
    }
    (sae_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _sae_tensors(s: TinySettings, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Unit-norm decoder columns; encoder rows follow them so real activations light features up."""
    d, n = s.hidden_size, s.d_sae
    w_dec = torch.randn(d, n, generator=g)
    w_dec = w_dec / w_dec.norm(dim=0, keepdim=True)
    noise = torch.randn(n, d, generator=g) * s.sae_enc_noise
    w_enc = w_dec.T * s.sae_enc_scale + noise
    b_enc = torch.full((n,), s.sae_b_enc) + torch.randn(n, generator=g) * 0.05
    b_dec = torch.randn(d, generator=g) * 0.01
    return {
        "W_enc": w_enc.contiguous(),
        "W_dec": w_dec.contiguous(),
        "b_enc": b_enc.contiguous(),
        "b_dec": b_dec.contiguous(),
    }
