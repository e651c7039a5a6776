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


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("Qwen3_5ForConditionalGeneration", "language_model.model.layers", "language_model.model.norm",
                 "language_model.lm_head", text_config="text_config"),
    Architecture("Qwen3_5ForCausalLM", "model.layers", "model.norm", "lm_head"),
    Architecture("Qwen3ForCausalLM", "model.layers", "model.norm", "lm_head"),
)}


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
