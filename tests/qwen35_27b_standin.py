"""Offline stand-ins for `Qwen/Qwen3.5-27B` and `Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50`, written
into a Hugging Face hub cache, so `configs/qwen3.5-27b.yaml` can be served as it is (hub ids,
reasoning and tool parsers) on a CPU with HF_HUB_OFFLINE=1.

What is real and what is small. The model's config.json has the 27B checkpoint's shape
(`Qwen3_5ForConditionalGeneration`, `model_type` qwen3_5, a `text_config` of `qwen3_5_text`
with Gated DeltaNet / gated attention layers every 4th, MTP and mRoPE keys, a `vision_config`
with the real tower's values, its output width the text width as there; vLLM skips the tower
under `language-model-only`, so its weights are not written), with tiny widths (REFERENCE.md section 4: bf16, head_dim 64, linear head dim 128)
and 49 decoder layers, the fewest for which the recipe's `sae-layers` [16, 32, 48] exist (the 27B
has 64; torch.compile's start-up grows with them: on the 2-core machine the engine was ready after
98 s with 49 tiny layers, 115-145 s with 64). The chat
template is this project's own, written to produce the real one's format: tools as JSON lines in
the system turn, `<think>\\n` opening every answer (`<think>\\n\\n</think>\\n\\n` with
`enable_thinking: false`), tool calls as `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE
\\n</parameter>\\n</function>\\n</tool_call>`, tool results as `<tool_response>` in a user turn;
`<think>`, `</think>`, `<tool_call>`, `</tool_call>` are single non-special tokens as in Qwen's
tokenizer, which is what vLLM's qwen3 reasoning parser and qwen3_coder tool parser look up. The
SAE repo holds the release's file set (README.md, LICENSE, app.py, `layer{n}.sae.pt`), only for
the steered layers, with the name's 81,920 features (W80K) in Qwen-Scope's tensor layout, and no
config.json (the release has none: k = 50 comes from the name).

The weights are a hand-built circuit, not trained (build time is seconds). Greedy decoding after
the generation prompt follows SCRIPT token by token: every token of the script is unique in it,
and the unembedding maps each token's embedding to its successor, so the decision at a position
depends only on the token read there (see `_circuit`). Everything else ends the turn. Around that:
  - residual layout: token dims | reasoning flag | city axis | free axes | bias | scratch. The
    decoder layers are random but write only into the scratch dims, which nothing reads out, so
    the script survives every layer's real kernels exactly; steering on the free axes changes
    nothing but the norms;
  - SAE features at every steered layer: one per token (its embedding direction), "reasoning"
    (the flag, set on the script's reasoning tokens), "city" (reading it makes the model say
    Berlin where it would say Paris) and free axes; the other features never fire.

Public sources of the shapes (the test module repeats them):
  - recipe: vllm-project/recipes `Qwen/Qwen3.5.md` (`--reasoning-parser qwen3`, tool calling with
    `--enable-auto-tool-choice --tool-call-parser qwen3_coder`, `--language-model-only`);
  - config.json: huggingface.co/Qwen/Qwen3.5-27B config.json, as reproduced in public code
    (the Qwen3.6-27B config.json has the same keys: e.g. `mamba_ssm_dtype`, `mtp_num_hidden_layers`,
    `mrope_section` [11, 11, 10], vision depth 27 / width 1152 / `out_hidden_size` = hidden);
  - chat template: Qwen3.5's chat_template.jinja (the copy in mlx-community/Qwen3.5-35B-A3B-4bit;
    an ollama issue renders the official Qwen/Qwen3.5-27B one to the same tool format);
  - the processor configs: Qwen3-VL's (Qwen3VLProcessor, patch 16, merge 2);
  - the cache layout: huggingface_hub's file_download.py (refs/main, snapshots/<sha> symlinks
    into blobs/).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.recipe.chatml_tokenizer import save_tokenizer, train_tokenizer
from models.recipe.qwen35_checkpoint import param_shapes, save_checkpoint, save_qwen_scope_layer, text_config
from tests.fixtures.tiny_circuit import SETTINGS as TINY_SETTINGS
from tests.fixtures.tiny_circuit import TinySettings
from tests.fixtures.tiny_model import CORPUS
from tests.sae_files import write_hub_cache

MODEL_REPO = "Qwen/Qwen3.5-27B"
SAE_REPO = "Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50"
SAE_LAYERS = (16, 32, 48)
D_SAE = 80 * 1024  # W80K
SAE_K = 50  # L0_50

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
# Stand-in only: the tool call's newline framing in tokens of their own, so no token repeats in
# the script (the real tokenizer spells these with ordinary tokens).
FRAMING_TOKENS = ("\n<function=", ">\n<parameter=", "\n</parameter>\n</function>\n")
ADDED_TOKENS = QWEN_ADDED_TOKENS + FRAMING_TOKENS

REASONING = "Checking current conditions through forecast service.\n"
TOOL_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
SCRIPT = REASONING + "</think>\n\n" + TOOL_CALL  # the greedy continuation of the generation prompt
STEERED_CITY = "Berlin"  # what the city feature makes the model write instead of Paris
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather report for one city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CHAT_TEMPLATE = """\
{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is none -%}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part.type == 'text' -%}{{- part.text -}}
{%- else -%}{{- raise_exception('This model reads text only.') -}}{%- endif -%}
{%- endfor -%}
{%- else -%}{{- raise_exception('Unexpected content type.') -}}{%- endif -%}
{%- endmacro -%}
{%- if not messages -%}{{- raise_exception('No messages provided.') -}}{%- endif -%}
{%- set has_system = messages[0].role == 'system' -%}
{%- if tools and tools is iterable and tools is not mapping -%}
{{- '<|im_start|>system\\n# Tools\\n\\nYou may call these functions:\\n<tools>' -}}
{%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}
{{- '\\n</tools>\\n\\nTo call one, reply with\\n<tool_call>\\n<function=NAME>\\n<parameter=ARGUMENT>\\nVALUE\\n'
    '</parameter>\\n</function>\\n</tool_call>' -}}
{%- if has_system -%}{{- '\\n\\n' + render(messages[0].content) | trim -}}{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\\n' + render(messages[0].content) | trim + '<|im_end|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- set content = render(message.content) | trim -%}
{%- if message.role == 'system' -%}
{%- if not loop.first -%}{{- raise_exception('System message must be at the beginning.') -}}{%- endif -%}
{%- elif message.role == 'user' -%}
{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = reasoning or content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] | trim -%}
{%- endif -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if loop.index0 > ns.last_user -%}{{- '<think>\\n' + reasoning | trim + '\\n</think>\\n\\n' -}}{%- endif -%}
{{- content -}}
{%- for call in message.tool_calls or [] -%}
{%- set call = call.function if call.function is defined else call -%}
{%- if not loop.first -%}{{- '\\n' -}}{%- elif content -%}{{- '\\n\\n' -}}{%- endif -%}
{{- '<tool_call>\\n<function=' + call.name + '>\\n' -}}
{%- if call.arguments is defined -%}
{%- for name, value in call.arguments | items -%}
{{- '<parameter=' + name + '>\\n' + (value if value is string else value | tojson) + '\\n</parameter>\\n' -}}
{%- endfor -%}
{%- endif -%}
{{- '</function>\\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
{%- else -%}{{- raise_exception('Unexpected message role.') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{{- '<think>\\n\\n</think>\\n\\n' if enable_thinking is defined and enable_thinking is false else '<think>\\n' -}}
{%- endif -%}
"""


VOCAB_SIZE = 640
# Residual stream layout (hidden_size 128) and the circuit's constants.
TOKEN_DIMS = 96
REASONING_DIM, CITY_DIM, FREE_DIMS, BIAS_DIM = 96, 97, (98, 99, 100, 101), 102
SCRATCH = slice(103, 128)  # the only dims the decoder layers write
TOKEN_NORM = 6.0  # every token's embedding norm in the token dims
REASONING_FLAG = 4.0  # the reasoning tokens' value on REASONING_DIM
BIAS = 4.0
READOUT = 3.0  # unembedding weight of a successor (and of Berlin on the city axis)
END_WEIGHT = 2.0  # <|im_end|> reads the bias dim: 8 against a successor's 18, before the final norm
MIX_GAIN = 0.05
DEAD_BIAS = -1000.0  # b_enc of the features nothing is built for: they never fire


@dataclasses.dataclass(frozen=True)
class LayerFeatures:
    """Feature indices of one steered layer's SAE."""

    token: dict[int, int]  # token id -> its token feature (fires TOKEN_NORM where that token is read)
    reasoning: int  # fires REASONING_FLAG on the script's reasoning tokens
    city: int  # clamp it (> TOKEN_NORM) where the city is due and the model writes Berlin
    free: tuple[int, ...]  # directions no layer and no output reads


@dataclasses.dataclass(frozen=True)
class StandIn:
    cache: Path  # HF_HUB_CACHE
    prompt_end: int  # the generation prompt's last token ("\n" after <think>)
    script_ids: tuple[int, ...]  # SCRIPT's tokens, then <|im_end|>
    reasoning_ids: tuple[int, ...]  # REASONING's tokens (the start of script_ids)
    city_cue: int  # the token after which the city is written
    berlin: int
    features: dict[int, LayerFeatures]  # per steered layer


@dataclasses.dataclass(frozen=True)
class Target:
    """What one stand-in pair copies of its real model and SAE release (the 27B's is TARGET_27B;
    tests/qwen_scope_standins.py has the other Qwen-Scope models)."""

    model_repo: str
    sae_repo: str
    sae_layers: tuple[int, ...]
    d_sae: int
    k: int
    release_layers: int  # the real model's decoder layers: the release has one file per layer
    model_config: Callable[[TinySettings, Any], dict]  # config.json around the tiny widths
    shapes: Callable[[TinySettings], dict[str, tuple[int, ...]]]  # checkpoint tensor names -> dims
    prefix: str = "model.language_model."  # of embed_tokens and layers in the checkpoint
    zero_centred_norms: bool = True  # Qwen3.5 RMSNorm scales by 1 + weight, Qwen3's by weight
    vision: bool = True  # a vision wrapper: write the processor configs

    @property
    def release(self) -> list[str]:
        return [".gitattributes", "LICENSE", "README.md", "app.py",
                *(f"layer{n}.sae.pt" for n in range(self.release_layers))]


def build_standins(cache: Path, num_layers: int = max(SAE_LAYERS) + 1, seed: int = 0,
                   target: Target | None = None) -> StandIn:
    """Write both repos of `target` (the 27B's by default) into the hub cache `cache` and say
    where the circuit's pieces are."""
    target = target or TARGET_27B
    # the tiny model's widths, which run on vLLM's CPU kernels (REFERENCE.md section 4)
    shape = dataclasses.replace(TINY_SETTINGS, vocab_size=VOCAB_SIZE, num_layers=num_layers)
    with tempfile.TemporaryDirectory(dir=cache.parent if cache.parent.is_dir() else None) as tmp:
        staging = Path(tmp)
        model_dir, sae_dir = staging / "model", staging / "sae"
        model_dir.mkdir()
        sae_dir.mkdir()
        tok = train_tokenizer([CORPUS, *_between_added_tokens(SCRIPT) * 40, STEERED_CITY * 40], shape.vocab_size,
                              SPECIAL_TOKENS, ADDED_TOKENS)
        save_tokenizer(tok, model_dir, CHAT_TEMPLATE, template_file=True)
        circuit = _circuit(tok, shape, seed)
        weights = _weights(shape, circuit, seed, target.shapes(shape), target.prefix, target.zero_centred_norms)
        save_checkpoint(target.model_config(shape, tok), weights, model_dir, generation=_generation_config(tok),
                        weights_file="model.safetensors-00001-of-00001.safetensors")
        if target.vision:
            _write_processor_configs(model_dir)
        (model_dir / "README.md").write_text(f"# {target.model_repo} (offline stand-in: tiny weights, real config "
                                             "shape)\n")
        features = _write_saes(sae_dir, shape, circuit, seed, target.sae_layers, target.d_sae, target.sae_repo,
                               target.model_repo, target.k)
        write_hub_cache(cache, target.model_repo, {p.name: p for p in sorted(model_dir.iterdir())})
        write_hub_cache(cache, target.sae_repo, {p.name: p for p in sorted(sae_dir.iterdir())},
                        listed=target.release)
    return StandIn(cache, circuit.prompt_end, circuit.script, circuit.reasoning, circuit.city_cue, circuit.berlin,
                   features)


# ----------------------------------------------------------------------------- config


def _model_config(shape: TinySettings, tok) -> dict:
    """The 27B's config.json shape around a tiny text model."""
    text = text_config(shape, tok, max_positions=262144)
    del text["architectures"]
    endoftext = tok.token_to_id("<|endoftext|>")
    rotary_pairs = int(shape.head_dim * shape.partial_rotary_factor) // 2
    text.update({
        "attn_output_gate": True,
        "bos_token_id": endoftext,
        "eos_token_id": endoftext,
        "pad_token_id": None,
        "mamba_ssm_dtype": "float32",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "partial_rotary_factor": shape.partial_rotary_factor,
        "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True,
                            "mrope_section": _mrope_section(rotary_pairs)},
    })
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "image_token_id": tok.token_to_id("<|image_pad|>"),
        "model_type": "qwen3_5",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": tok.token_to_id("<|video_pad|>"),
        "vision_config": {
            "deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
            "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_5",
            "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": shape.hidden_size,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        "vision_end_token_id": tok.token_to_id("<|vision_end|>"),
        "vision_start_token_id": tok.token_to_id("<|vision_start|>"),
    }


def _mrope_section(pairs: int) -> list[int]:
    """The 27B splits its 32 rotary pairs [11, 11, 10] over (time, height, width); the same split
    for the stand-in's pairs."""
    base, extra = divmod(pairs, 3)
    return [base + (1 if i < extra else 0) for i in range(3)]


def _generation_config(tok) -> dict:
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    return {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext,
            "do_sample": False}


def _write_processor_configs(out: Path) -> None:
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor"}
    image = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, **common,
             "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, **common,
             "video_processor_type": "Qwen3VLVideoProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")


# ----------------------------------------------------------------------------- circuit


@dataclasses.dataclass(frozen=True)
class _Circuit:
    prompt_end: int
    script: tuple[int, ...]
    reasoning: tuple[int, ...]
    successor: dict[int, int]  # token read -> token written; every other token -> <|im_end|>
    city_cue: int
    berlin: int
    directions: torch.Tensor  # [vocab, TOKEN_DIMS] unit rows


def _between_added_tokens(text: str) -> list[str]:
    """The pieces the tokenizer's BPE sees in `text` (added tokens are cut out first), so training
    on them learns the merges the script needs."""
    return [piece for piece in re.split("|".join(map(re.escape, ADDED_TOKENS)), text) if piece]


def _single_token(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise RuntimeError(f"the stand-in's tokenizer splits {text!r} into {len(ids)} tokens; the circuit needs one")
    return ids[0]


def _circuit(tok, shape: TinySettings, seed: int) -> _Circuit:
    """The successor map: the generation prompt's last token ("\\n" after <think>) -> the script's
    first token -> ... -> its last -> <|im_end|>; Berlin continues like Paris. Tokens that read
    into it get orthonormal directions (so no successor leaks into another's decision); all other
    tokens get random directions orthogonal to those, and so write <|im_end|>."""
    script = tok.encode(SCRIPT, add_special_tokens=False).ids
    reasoning = tok.encode(REASONING, add_special_tokens=False).ids
    if script[: len(reasoning)] != reasoning or tok.decode(script, skip_special_tokens=False) != SCRIPT:
        raise RuntimeError("the script does not tokenize as its reasoning followed by the rest")
    prompt_end, berlin, paris = _single_token(tok, "\n"), _single_token(tok, STEERED_CITY), _single_token(tok, "Paris")
    chain = [prompt_end, *script, tok.token_to_id("<|im_end|>")]
    if len(set(chain)) != len(chain) or berlin in chain:
        raise RuntimeError("a token repeats in the script, so a successor circuit cannot follow it")
    successor = dict(zip(chain[:-1], chain[1:]))
    successor[berlin] = successor[paris]
    g = torch.Generator().manual_seed(seed)
    readers = sorted(successor)
    directions = torch.randn(shape.vocab_size, TOKEN_DIMS, generator=g)
    directions[:, : len(readers)] = 0.0
    directions[readers] = 0.0
    directions[readers, : len(readers)] = torch.linalg.qr(torch.randn(len(readers), len(readers), generator=g))[0]
    directions = directions / directions.norm(dim=1, keepdim=True)
    city_cue = script[script.index(paris) - 1]
    return _Circuit(prompt_end, tuple(chain[1:]), tuple(reasoning), successor, city_cue, berlin, directions)


def _weights(shape: TinySettings, c: _Circuit, seed: int, shapes: dict[str, tuple[int, ...]] | None = None,
             prefix: str = "model.language_model.", zero_centred_norms: bool = True) -> dict[str, torch.Tensor]:
    """Language-model tensors in bfloat16, by default under their Qwen3_5ForConditionalGeneration
    names; other architectures give their own `shapes` (names -> dims), embedding `prefix` and
    norm convention (Qwen3's RMSNorm scales by weight, Qwen3.5's by 1 + weight)."""
    g = torch.Generator().manual_seed(seed + 1)
    shapes = param_shapes(shape, prefix) if shapes is None else shapes
    state = {name: _mixing_tensor(name, dims, g, zero_centred_norms) for name, dims in shapes.items()}
    emb = torch.zeros(shape.vocab_size, shape.hidden_size)
    emb[:, :TOKEN_DIMS] = c.directions * TOKEN_NORM
    emb[list(c.reasoning), REASONING_DIM] = REASONING_FLAG
    emb[:, BIAS_DIM] = BIAS
    head = torch.zeros(shape.vocab_size, shape.hidden_size)
    for read, write in c.successor.items():
        head[write, :TOKEN_DIMS] += READOUT * c.directions[read]
    head[c.berlin, CITY_DIM] = READOUT
    head[c.script[-1], BIAS_DIM] = END_WEIGHT  # <|im_end|>: every token without a successor ends the turn
    state[prefix + "embed_tokens.weight"] = emb
    state["lm_head.weight"] = head
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def _mixing_tensor(name: str, dims: tuple[int, ...], g: torch.Generator, zero_centred_norms: bool = True
                   ) -> torch.Tensor:
    """Random decoder layers whose outputs land in the scratch dims only (MoE experts and shared
    experts included: their down projections end in down_proj.weight)."""
    if name.endswith("linear_attn.norm.weight"):
        return torch.ones(dims)  # gated RMSNorm multiplies by weight (not 1 + weight)
    if "norm" in name:  # Qwen3.5 RMSNorm scales by 1 + weight, Qwen3's by weight
        return torch.zeros(dims) if zero_centred_norms else torch.ones(dims)
    if name.endswith("dt_bias"):
        return torch.ones(dims)
    if name.endswith("A_log"):
        return torch.empty(dims).uniform_(1.0, 8.0, generator=g).log()
    weight = torch.randn(dims, generator=g) / math.sqrt(dims[-1])
    if name.endswith(("out_proj.weight", "down_proj.weight", "o_proj.weight")):
        written = torch.zeros_like(weight)
        written[SCRATCH] = weight[SCRATCH] * MIX_GAIN
        return written
    return weight


# ----------------------------------------------------------------------------- SAEs


def _write_saes(out: Path, shape: TinySettings, c: _Circuit, seed: int, layers: tuple[int, ...] = SAE_LAYERS,
                d_sae: int = D_SAE, repo: str = SAE_REPO, model_repo: str = MODEL_REPO,
                k: int = SAE_K) -> dict[int, LayerFeatures]:
    """The release's files: layer{n}.sae.pt for the steered layers, README.md, LICENSE, app.py."""
    unit = torch.zeros(shape.vocab_size + 2 + len(FREE_DIMS), shape.hidden_size)
    unit[: shape.vocab_size, :TOKEN_DIMS] = c.directions
    for row, dim in enumerate((REASONING_DIM, CITY_DIM, *FREE_DIMS), start=shape.vocab_size):
        unit[row, dim] = 1.0
    features = {}
    for layer in layers:
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        index = torch.randperm(d_sae, generator=g)[: len(unit)]
        w_dec = torch.randn(shape.hidden_size, d_sae, generator=g)
        w_dec = w_dec / w_dec.norm(dim=0, keepdim=True)
        w_dec[:, index] = unit.T
        b_enc = torch.full((d_sae,), DEAD_BIAS)
        b_enc[index] = 0.0
        save_qwen_scope_layer(out, layer, {
            "W_enc": w_dec.T.contiguous(), "W_dec": w_dec.contiguous(), "b_enc": b_enc,
            "b_dec": torch.zeros(shape.hidden_size)})
        ids = index.tolist()
        features[layer] = LayerFeatures(token=dict(enumerate(ids[: shape.vocab_size])), reasoning=ids[-6],
                                        city=ids[-5], free=tuple(ids[-4:]))
    (out / "README.md").write_text(f"# {repo.split('/')[1]} (offline stand-in)\n\nTopK SAEs (k = {k}, "
                                   f"{d_sae} features) on the residual stream after decoder layers "
                                   f"{', '.join(map(str, layers))} of the stand-in for {model_repo}.\n")
    (out / "LICENSE").write_text("Apache License 2.0 (stand-in: https://www.apache.org/licenses/LICENSE-2.0)\n")
    (out / "app.py").write_text('"""Stand-in for the release\'s Gradio demo; never run by the server."""\n')
    return features


TARGET_27B = Target(MODEL_REPO, SAE_REPO, SAE_LAYERS, D_SAE, SAE_K, release_layers=64, model_config=_model_config,
                    shapes=lambda shape: param_shapes(shape, "model.language_model."))
