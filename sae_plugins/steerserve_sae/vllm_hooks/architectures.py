"""Where each supported architecture keeps what steering needs: one entry per architecture.

The layer patch (model_patch.py), the logit lens (capture/logit_lens.py) and the CLI's pre-flight
all read it from here; supporting a new architecture is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitecture(RuntimeError):
    pass


@dataclass(frozen=True)
class Architecture:
    name: str  # the `architectures` entry of the model's config.json
    decoder_layers: str  # attribute paths from vLLM's top-level model
    final_norm: str
    lm_head: str
    text_config: str | None = None  # the config.json key holding hidden_size, when nested

    def hidden_size(self, hf_config: dict) -> int | None:
        """The residual stream width, from a config.json as a dict."""
        config = hf_config.get(self.text_config, {}) if self.text_config else hf_config
        return config.get("hidden_size")

    def num_layers(self, hf_config: dict) -> int | None:
        """The decoder layer count, from a config.json as a dict."""
        config = hf_config.get(self.text_config, {}) if self.text_config else hf_config
        return config.get("num_hidden_layers")

    def decoder_layers_of(self, model: nn.Module) -> nn.ModuleList:
        return _resolve(model, self.decoder_layers)

    def final_norm_of(self, model: nn.Module) -> nn.Module:
        return _resolve(model, self.final_norm)

    def lm_head_of(self, model: nn.Module) -> nn.Module:
        return _resolve(model, self.lm_head)


def _wrapped(name: str) -> Architecture:
    """A vision + text wrapper (vLLM keeps the text model under `language_model`)."""
    return Architecture(name, "language_model.model.layers", "language_model.model.norm", "language_model.lm_head",
                        text_config="text_config")


def _text(name: str) -> Architecture:
    return Architecture(name, "model.layers", "model.norm", "lm_head")


# Qwen-Scope's models (docs/qwen-scope-models.md): dense Qwen3 (1.7B, 8B), Qwen3 MoE (30B-A3B),
# Qwen3.5 (2B, 9B, 27B) and Qwen3.5 MoE (35B-A3B), each text-only or as its vision wrapper.
# vLLM's MoE decoder layers return (hidden_states, residual) like the dense ones, the expert
# sum (routed + gated shared expert) already all-reduced, so the steering op sees the same
# stream; the one layout where it is not whole is refused in `check_steerable_layer`.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _wrapped("Qwen3_5ForConditionalGeneration"),
    _wrapped("Qwen3_5MoeForConditionalGeneration"),
    _text("Qwen3_5ForCausalLM"),
    _text("Qwen3_5MoeForCausalLM"),
    _text("Qwen3ForCausalLM"),
    _text("Qwen3MoeForCausalLM"),
)}


def check_steerable_layer(layer: nn.Module, index: int) -> None:
    """Refuse a decoder layer whose output is not the whole residual stream of every token.

    vLLM's Qwen3-Next / Qwen3.5 MoE layers with sequence-parallel MoE (expert parallelism with
    tensor parallelism > 1 and an all-to-all backend such as the default allgather_reducescatter)
    reduce-scatter the attention output over the tensor-parallel ranks and hand the next layer
    only this rank's share of the tokens; the per-token steering routing assumes every rank holds
    every row in the scheduler's order."""
    if getattr(layer, "use_attn_reduce_scatter_for_moe", False):
        raise UnsupportedArchitecture(
            f"decoder layer {index} ({type(layer).__name__}) runs sequence-parallel MoE: between layers each "
            "tensor-parallel rank holds only its share of the tokens, and SAE steering needs the whole "
            "residual stream; serve without --enable-expert-parallel, or with tensor-parallel-size 1 and "
            "data parallelism for the experts"
        )


def architecture(name: str) -> Architecture:
    found = ARCHITECTURES.get(name)
    if found is None:
        raise UnsupportedArchitecture(
            f"SAE steering does not support the architecture {name!r}; "
            f"supported architectures: {', '.join(sorted(ARCHITECTURES))}"
        )
    return found


def _resolve(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module
