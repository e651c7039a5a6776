"""Hugging Face checkpoints of small text-only Qwen3.5 models (what vLLM serves as
Qwen3_5ForCausalLM) and their SAE sets in the Qwen-Scope layout, shared by the hand-built test
fixture and the trained default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch


class Qwen35Shape(Protocol):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    full_attention_interval: int  # every n-th layer is gated full attention, the rest Gated DeltaNet
    num_heads: int
    num_kv_heads: int
    head_dim: int
    linear_key_heads: int
    linear_value_heads: int
    linear_head_dim: int
    conv_kernel: int
    rope_theta: float
    partial_rotary_factor: float


def text_config(shape: Qwen35Shape, tok, max_positions: int = 4096) -> dict:
    """config.json; ChatML's <|im_end|> ends a turn, <|endoftext|> pads."""
    layer_types = [
        "full_attention" if (i + 1) % shape.full_attention_interval == 0 else "linear_attention"
        for i in range(shape.num_layers)
    ]
    return {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": layer_types,
        "full_attention_interval": shape.full_attention_interval,
        "linear_conv_kernel_dim": shape.conv_kernel,
        "linear_key_head_dim": shape.linear_head_dim,
        "linear_value_head_dim": shape.linear_head_dim,
        "linear_num_key_heads": shape.linear_key_heads,
        "linear_num_value_heads": shape.linear_value_heads,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": shape.rope_theta,
            "partial_rotary_factor": shape.partial_rotary_factor,
        },
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "dtype": "bfloat16",
        "use_cache": True,
    }


def param_shapes(shape: Qwen35Shape, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF text checkpoint, by name (mirrors modeling_qwen3_5); `prefix` is
    "model." for Qwen3_5ForCausalLM, "model.language_model." inside Qwen3_5ForConditionalGeneration."""
    d, m = shape.hidden_size, shape.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}embed_tokens.weight": (shape.vocab_size, d),
        f"{prefix}norm.weight": (d,),
        "lm_head.weight": (shape.vocab_size, d),
    }
    key_dim = shape.linear_key_heads * shape.linear_head_dim
    value_dim = shape.linear_value_heads * shape.linear_head_dim
    for i in range(shape.num_layers):
        p = f"{prefix}layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (m, d)
        shapes[p + "mlp.up_proj.weight"] = (m, d)
        shapes[p + "mlp.down_proj.weight"] = (d, m)
        if (i + 1) % shape.full_attention_interval == 0:
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = (shape.num_heads * shape.head_dim * 2, d)  # query + output gate
            shapes[a + "k_proj.weight"] = (shape.num_kv_heads * shape.head_dim, d)
            shapes[a + "v_proj.weight"] = (shape.num_kv_heads * shape.head_dim, d)
            shapes[a + "o_proj.weight"] = (d, shape.num_heads * shape.head_dim)
            shapes[a + "q_norm.weight"] = (shape.head_dim,)
            shapes[a + "k_norm.weight"] = (shape.head_dim,)
        else:
            a = p + "linear_attn."
            shapes[a + "in_proj_qkv.weight"] = (2 * key_dim + value_dim, d)
            shapes[a + "in_proj_z.weight"] = (value_dim, d)
            shapes[a + "in_proj_b.weight"] = (shape.linear_value_heads, d)
            shapes[a + "in_proj_a.weight"] = (shape.linear_value_heads, d)
            shapes[a + "conv1d.weight"] = (2 * key_dim + value_dim, 1, shape.conv_kernel)
            shapes[a + "dt_bias"] = (shape.linear_value_heads,)
            shapes[a + "A_log"] = (shape.linear_value_heads,)
            shapes[a + "norm.weight"] = (shape.linear_head_dim,)
            shapes[a + "out_proj.weight"] = (d, value_dim)
    return shapes


def save_checkpoint(config: dict, state: dict[str, torch.Tensor], out: Path, generation: dict | None = None,
                    weights_file: str = "model.safetensors") -> None:
    """config.json, generation_config.json (by default greedy, stopping at either special) and the
    weights; a `weights_file` named like a shard of a sharded checkpoint gets its index too."""
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation is None:
        generation = {
            "eos_token_id": [config["eos_token_id"], config["pad_token_id"]],
            "pad_token_id": config["pad_token_id"],
            "do_sample": False,
        }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(state, str(out / weights_file), metadata={"format": "pt"})
    if weights_file != "model.safetensors":
        size = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": size}, "weight_map": {name: weights_file for name in sorted(state)}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_qwen_scope_layer(sae_dir: Path, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    """layer{n}.sae.pt: a plain dict of fp32 W_enc [d_sae, d_model], W_dec [d_model, d_sae],
    b_enc [d_sae], b_dec [d_model], as Qwen-Scope publishes them."""
    torch.save(tensors, sae_dir / f"layer{layer}.sae.pt")


def save_qwen_scope_config(sae_dir: Path, *, base_model: str, d_model: int, d_sae: int, k: int,
                           num_layers: int) -> None:
    """config.json beside the layer files, which Qwen-Scope's release does not have: it gives this
    project's own SAEs their k, where a released set's directory name (SAE-Res-...-L0_{k}) does."""
    config = {
        "model_type": "topk_sae",
        "base_model": base_model,
        "d_model": d_model,
        "d_sae": d_sae,
        "k": k,
        "num_layers": num_layers,
        "hook_point": "resid_post",
        "dtype": "float32",
    }
    (sae_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
