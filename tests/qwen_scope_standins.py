"""The Qwen-Scope models and their SAE releases, and offline stand-ins of their shapes.

QWEN_SCOPE_MODELS lists the seven models of the release (sae-lens 6.54's `pretrained_saes.yaml`,
releases `qwen-scope-*`: model, repo ids, one `layer{n}.sae.pt` per decoder layer) with what
their public config.json files say: architecture, decoder layers, hidden size and MoE structure.
`target(model)` turns one into a stand-in target for tests/qwen35_27b_standin.build_standins,
which writes it into an offline hub cache: a tiny random checkpoint whose config.json has the
model's architecture and structure (Qwen3 dense or MoE: routed experts, router, top-k, no shared
expert; Qwen3.5 MoE: the Gated DeltaNet / full attention layer pattern, routed experts plus a
gated shared expert, the vision config of the wrapper) with the 27B stand-in's tiny widths and
hand-built circuit, and one of the model's SAE repos, named exactly like the release.

Public sources: sae-lens `pretrained_saes.yaml` and `qwen_scope` loader (repo ids, model, layer
counts, d_in); the models' config.json as reproduced in public code (Qwen3-30B-A3B: 128 experts,
top-8, moe_intermediate_size 768, no shared expert; Qwen3.5-35B-A3B: 256 experts, top-8,
moe_intermediate_size 512, a shared expert of 512 with its sigmoid gate, 16 heads / 2 KV heads
of 256, linear attention 16 key / 32 value heads of 128); vLLM 0.32's model registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.qwen35_27b_standin import Target, _model_config as _qwen35_wrapper_config
from models.recipe.qwen35_checkpoint import param_shapes as qwen35_param_shapes


@dataclass(frozen=True)
class QwenScopeModel:
    repo: str  # the model the SAEs were trained on
    architecture: str  # its config.json's architectures[0]
    num_layers: int
    hidden_size: int
    sae_repos: tuple[str, str]
    config: str  # configs/<name>.yaml
    num_experts: int = 0  # routed experts (MoE)
    experts_per_token: int = 0
    shared_expert: bool = False

    @property
    def moe(self) -> bool:
        return self.num_experts > 0


def _repos(model: str, *suffixes: str) -> tuple[str, str]:
    return tuple(f"Qwen/SAE-Res-{model}-{s}" for s in suffixes)  # type: ignore[return-value]


QWEN_SCOPE_MODELS: dict[str, QwenScopeModel] = {m.repo: m for m in (
    QwenScopeModel("Qwen/Qwen3-1.7B-Base", "Qwen3ForCausalLM", 28, 2048,
                   _repos("Qwen3-1.7B-Base", "W32K-L0_50", "W32K-L0_100"), "qwen3-1.7b-base.yaml"),
    QwenScopeModel("Qwen/Qwen3-8B-Base", "Qwen3ForCausalLM", 36, 4096,
                   _repos("Qwen3-8B-Base", "W64K-L0_50", "W64K-L0_100"), "qwen3-8b-base.yaml"),
    QwenScopeModel("Qwen/Qwen3-30B-A3B-Base", "Qwen3MoeForCausalLM", 48, 2048,
                   _repos("Qwen3-30B-A3B-Base", "W32K-L0_50", "W128K-L0_100"), "qwen3-30b-a3b-base.yaml",
                   num_experts=128, experts_per_token=8),
    QwenScopeModel("Qwen/Qwen3.5-2B-Base", "Qwen3_5ForConditionalGeneration", 24, 2048,
                   _repos("Qwen3.5-2B-Base", "W32K-L0_50", "W32K-L0_100"), "qwen3.5-2b-base.yaml"),
    QwenScopeModel("Qwen/Qwen3.5-9B-Base", "Qwen3_5ForConditionalGeneration", 32, 4096,
                   _repos("Qwen3.5-9B-Base", "W64K-L0_50", "W64K-L0_100"), "qwen3.5-9b-base.yaml"),
    QwenScopeModel("Qwen/Qwen3.5-27B", "Qwen3_5ForConditionalGeneration", 64, 5120,
                   _repos("Qwen3.5-27B", "W80K-L0_50", "W80K-L0_100"), "qwen3.5-27b.yaml"),
    QwenScopeModel("Qwen/Qwen3.5-35B-A3B-Base", "Qwen3_5MoeForConditionalGeneration", 40, 2048,
                   _repos("Qwen3.5-35B-A3B-Base", "W32K-L0_50", "W128K-L0_100"), "qwen3.5-35b-a3b-base.yaml",
                   num_experts=256, experts_per_token=8, shared_expert=True),
)}

# The stand-ins' MoE: few tiny experts, the real top-k.
STANDIN_EXPERTS = 16
STANDIN_EXPERT_WIDTH = 64


def _qwen3_config(model: QwenScopeModel, shape, tok) -> dict:
    """A Qwen3 / Qwen3 MoE config.json (the real key set) around the tiny widths."""
    endoftext = tok.token_to_id("<|endoftext|>")
    config = {
        "architectures": [model.architecture],
        "model_type": "qwen3_moe" if model.moe else "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": endoftext,
        "eos_token_id": endoftext,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_window": None,
        "tie_word_embeddings": False,  # the stand-in's circuit needs its own unembedding
        "dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": shape.vocab_size,
    }
    if model.moe:
        config.update({
            "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": STANDIN_EXPERT_WIDTH,
            "norm_topk_prob": True, "num_experts": STANDIN_EXPERTS, "num_experts_per_tok": model.experts_per_token,
            "output_router_logits": False, "router_aux_loss_coef": 0.001,
        })
    return dict(sorted(config.items()))


def _qwen3_shapes(model: QwenScopeModel, shape) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3 / Qwen3 MoE checkpoint (modeling_qwen3(_moe) names; experts one
    by one, as the released checkpoints store them)."""
    d, h = shape.hidden_size, shape.head_dim
    shapes = {"model.embed_tokens.weight": (shape.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (shape.vocab_size, d)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (shape.num_heads * h, d),
                   p + "self_attn.k_proj.weight": (shape.num_kv_heads * h, d),
                   p + "self_attn.v_proj.weight": (shape.num_kv_heads * h, d),
                   p + "self_attn.o_proj.weight": (d, shape.num_heads * h),
                   p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)}
        shapes |= _moe_shapes(p, d, shared=False) if model.moe else _mlp_shapes(p + "mlp.", d, shape.intermediate_size)
    return shapes


def _mlp_shapes(p: str, d: int, width: int) -> dict[str, tuple[int, ...]]:
    return {p + "gate_proj.weight": (width, d), p + "up_proj.weight": (width, d), p + "down_proj.weight": (d, width)}


def _moe_shapes(p: str, d: int, shared: bool) -> dict[str, tuple[int, ...]]:
    """Router, routed experts and (Qwen3.5 MoE) the shared expert with its gate."""
    shapes = {p + "mlp.gate.weight": (STANDIN_EXPERTS, d)}
    for e in range(STANDIN_EXPERTS):
        shapes |= _mlp_shapes(f"{p}mlp.experts.{e}.", d, STANDIN_EXPERT_WIDTH)
    if shared:
        shapes |= _mlp_shapes(p + "mlp.shared_expert.", d, STANDIN_EXPERT_WIDTH)
        shapes[p + "mlp.shared_expert_gate.weight"] = (1, d)
    return shapes


def _qwen35_config(model: QwenScopeModel, shape, tok) -> dict:
    """The Qwen3.5 wrapper's config.json (the 27B stand-in's), as a MoE model where it is one."""
    config = _qwen35_wrapper_config(shape, tok)
    config["architectures"] = [model.architecture]
    if model.moe:
        text = config["text_config"]
        del text["intermediate_size"]
        text.update({"model_type": "qwen3_5_moe_text", "mlp_only_layers": [],
                     "moe_intermediate_size": STANDIN_EXPERT_WIDTH, "num_experts": STANDIN_EXPERTS,
                     "num_experts_per_tok": model.experts_per_token, "norm_topk_prob": True,
                     "shared_expert_intermediate_size": STANDIN_EXPERT_WIDTH, "router_aux_loss_coef": 0.001})
        config["text_config"] = dict(sorted(text.items()))
        config["model_type"] = config["vision_config"]["model_type"] = "qwen3_5_moe"
    return config


def _qwen35_shapes(model: QwenScopeModel, shape) -> dict[str, tuple[int, ...]]:
    prefix = "model.language_model."
    dense = qwen35_param_shapes(shape, prefix)
    if not model.moe:
        return dense
    shapes = {name: dims for name, dims in dense.items() if ".mlp." not in name}
    for i in range(shape.num_layers):
        shapes |= _moe_shapes(f"{prefix}layers.{i}.", shape.hidden_size, shared=model.shared_expert)
    return shapes


def target(model: QwenScopeModel, sae_repo: str, sae_layers: tuple[int, ...]) -> Target:
    """The stand-in target of `model` with its SAE repo `sae_repo` (width and k from the name
    the way the release defines them, written out here rather than parsed by the server's code)."""
    name = sae_repo.rsplit("-W", 1)[1]  # e.g. "32K-L0_50"
    width, k = name.split("K-L0_")
    qwen3 = model.architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    return Target(
        model.repo, sae_repo, sae_layers, int(width) * 1024, int(k), release_layers=model.num_layers,
        model_config=(lambda shape, tok: _qwen3_config(model, shape, tok)) if qwen3 else
        (lambda shape, tok: _qwen35_config(model, shape, tok)),
        shapes=(lambda shape: _qwen3_shapes(model, shape)) if qwen3 else (lambda shape: _qwen35_shapes(model, shape)),
        prefix="model." if qwen3 else "model.language_model.", zero_centred_norms=not qwen3, vision=not qwen3,
    )

