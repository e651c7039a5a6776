"""Independent plain-PyTorch reference for SAE steering, used to check the vLLM server.

Deliberately shares no code with `sae_plugins` or `server`: it reads the SAE files itself (Qwen-Scope
`.pt`, SAELens and sparsify safetensors, each encoded by its format's own definition), applies
the steering formulas with a forward hook on the Hugging Face model, and decodes
greedily by re-running the whole sequence every step (no KV cache), so which positions a hook
touches is never in doubt.

Steering formulas, at the residual stream after decoder layer n (Qwen-Scope `resid_post`,
i.e. the output of `model.model.layers[n]`), with d_i feature i's decoder direction and f = encode(x):

    add:    x += value * d_i
    clamp:  x += (value - f_i) * d_i
    scale:  x += (value - 1) * f_i * d_i
    ablate: clamp to 0

Direction vectors, at the same point, with v a raw d_model direction and u = v / |v|:

    add:    x += value * v
    cap:    x -= max(0, x . u - value) * u     (the projection on u is at most value)
    ablate: x -= (x . u) * u

All features and vectors of one layer read f (and x . u) from the same unedited x; their edits
are summed.

Gates (`when`): an edit with `when = {layer: L, index: j, above: a, below: b}` is multiplied,
per position, by 1 if a < f_j < b (a missing bound is unbounded) else 0, where f_j is computed
from the residual stream after layer L as it arrived there, before layer L's own edits (so
it includes the edits of layers before L).

`apply_to` picks the sequence positions that get edited: "all", "prompt" (positions before the
prompt length) or "generation" (positions of generated tokens fed back in). So with
"generation" the first generated token is never steered: it is predicted from the prompt's
last position.

Precision: the server keeps SAE weights in the model dtype (bfloat16), so the reference rounds
the fp32 file weights to bfloat16 once, then does all SAE math in float32 on the bf16 residual
stream upcast, and rounds the edited stream back to bfloat16 (the model's dtype). Expect
agreement with the server at bfloat16 level, not bit-exact.

Comparing with the server. vLLM's CPU kernels and this model differ by ~1-2% in the residual
stream. On the tiny test model (tests/fixtures/tiny_model.py) unsteered greedy runs and most steered
ones match token for token, but steering can create genuine near-ties (two logits within
~0.1), where either answer is right, and even this reference's step-by-step recomputation and
a single full pass can disagree there. tests/test_differential.py therefore compares on cases
whose greedy choices are clear (see its docstring).

    ref = load_reference(model_dir)
    prompt = ref.chat_prompt_ids([{"role": "user", "content": "Hello!"}])
    tokens, logprobs = ref.greedy_generate(prompt, 16, steering=[(3, 600, "add", 6.0)])
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Mode = Literal["add", "clamp", "scale", "ablate"]
ApplyTo = Literal["all", "prompt", "generation"]
MODES = ("add", "clamp", "scale", "ablate")
APPLY_TO = ("all", "prompt", "generation")


@dataclass(frozen=True)
class When:
    """A gate: feature `index` of the SAE at `layer` strictly between above and below."""

    layer: int
    index: int
    above: float | None = None
    below: float | None = None

    def passes(self, f_j: torch.Tensor) -> torch.Tensor:
        ok = torch.ones_like(f_j, dtype=torch.bool)
        if self.above is not None:
            ok &= f_j > self.above
        if self.below is not None:
            ok &= f_j < self.below
        return ok


@dataclass(frozen=True)
class Feature:
    """One steering instruction: edit SAE feature `index` at layer `layer` (where `when` passes)."""

    layer: int
    index: int
    mode: Mode
    value: float = 0.0
    when: When | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}; expected one of {MODES}")


FeatureLike = Feature | Sequence | Mapping
VECTOR_MODES = ("add", "cap", "ablate")


@dataclass(frozen=True, eq=False)
class Vector:
    """One direction-vector instruction at layer `layer` (where `when` passes)."""

    layer: int
    v: torch.Tensor  # float32 [d_model]
    mode: str
    value: float = 0.0
    when: When | None = None

    def __post_init__(self) -> None:
        if self.mode not in VECTOR_MODES:
            raise ValueError(f"unknown vector mode {self.mode!r}; expected one of {VECTOR_MODES}")

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The edit [..., d_model] (float32) of stream x."""
        x = x.to(torch.float32)
        if self.mode == "add":
            return torch.full(x.shape[:-1], self.value).unsqueeze(-1) * self.v
        u = self.v.double() / self.v.double().norm()
        projection = x.double() @ u
        removed = projection if self.mode == "ablate" else torch.clamp(projection - self.value, min=0.0)
        return (-removed.unsqueeze(-1) * u).to(torch.float32)


def as_vector(spec: Vector | Mapping) -> Vector:
    """Accept a Vector or the API's dict: `vector` is base64 of little-endian float32s."""
    if isinstance(spec, Vector):
        return spec
    raw = base64.b64decode(spec["vector"])
    v = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()  # little-endian hosts only
    when = spec.get("when")
    return Vector(int(spec["layer"]), v, spec["mode"], float(spec.get("value") or 0.0),
                  When(**when) if when is not None else None)


def as_feature(spec: FeatureLike) -> Feature:
    """Accept a Feature, a (layer, index, mode[, value]) tuple or a dict with those keys."""
    if isinstance(spec, Feature):
        return spec
    if isinstance(spec, Mapping):
        value = spec.get("value", spec.get("strength", 0.0))
        when = spec.get("when")
        return Feature(int(spec["layer"]), int(spec["index"]), spec["mode"], float(value or 0.0),
                       When(**when) if when is not None else None)
    layer, index, mode, *rest = spec
    return Feature(int(layer), int(index), mode, float(rest[0]) if rest and rest[0] is not None else 0.0)


class ReferenceSAE:
    """An SAE as its format defines it. Weights are rounded to the serving dtype once (as the
    server stores them), then everything is computed in float32. Subclasses give `encode` from
    their format's own definition and the decoder `directions` [d_sae, d_model]."""

    directions: torch.Tensor
    b_dec: torch.Tensor

    @property
    def d_sae(self) -> int:
        return self.directions.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat = f @ directions + b_dec (float32)."""
        return f.to(torch.float32) @ self.directions + self.b_dec

    def steering_delta(self, x: torch.Tensor, features: Sequence[Feature],
                       gates: Mapping[When, torch.Tensor] | None = None) -> torch.Tensor:
        """Summed edit [..., d_model] (float32) for features of this layer, all read from x;
        `gates` holds each gated feature's pass/fail per position."""
        f = self.encode(x)
        delta = torch.zeros(x.shape, dtype=torch.float32)
        for feat in features:
            if not 0 <= feat.index < self.d_sae:
                raise IndexError(f"feature {feat.index} out of range for d_sae={self.d_sae}")
            coef = _coefficient(feat, f[..., feat.index])
            if feat.when is not None:
                coef = coef * gates[feat.when].to(torch.float32)
            delta = delta + coef.unsqueeze(-1) * self.directions[feat.index]
        return delta


def _cast(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    return tensors[name].to(dtype).to(torch.float32)


def _topk_then_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))


class QwenScopeSAE(ReferenceSAE):
    """Qwen-Scope: f = TopK_k(ReLU(x @ W_enc.T + b_enc)); feature i = W_dec[:, i]."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], k: int, dtype: torch.dtype) -> None:
        self.W_enc = _cast(tensors, "W_enc", dtype)  # [d_sae, d_model]
        self.b_enc = _cast(tensors, "b_enc", dtype)
        self.directions = _cast(tensors, "W_dec", dtype).T  # file: [d_model, d_sae]
        self.b_dec = _cast(tensors, "b_dec", dtype)
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x.to(torch.float32) @ self.W_enc.T + self.b_enc)
        return _topk_then_relu(pre, self.k)


class SAELensSAE(ReferenceSAE):
    """SAELens (standard / jumprelu / topk): pre = (x - b_dec if apply_b_dec_to_input) @ W_enc
    + b_enc with W_enc [d_in, d_sae]; standard relu(pre), jumprelu relu(pre) * (pre > threshold),
    topk: top-k of pre, then ReLU. Feature i = W_dec[i] (W_dec [d_sae, d_in])."""

    def __init__(self, cfg: Mapping, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.architecture = cfg["architecture"]
        self.apply_b_dec = bool(cfg.get("apply_b_dec_to_input", False))
        self.k = cfg.get("k")
        self.W_enc = _cast(tensors, "W_enc", dtype)
        self.b_enc = _cast(tensors, "b_enc", dtype)
        self.directions = _cast(tensors, "W_dec", dtype)
        self.b_dec = _cast(tensors, "b_dec", dtype)
        self.threshold = _cast(tensors, "threshold", dtype) if self.architecture == "jumprelu" else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        pre = (x - self.b_dec if self.apply_b_dec else x) @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            return _topk_then_relu(pre, int(self.k))
        return torch.relu(pre)


class SparsifySAE(ReferenceSAE):
    """EleutherAI sparsify: f = topk(relu(encoder(x - b_dec))); feature i = W_dec[i]."""

    def __init__(self, cfg: Mapping, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.weight = _cast(tensors, "encoder.weight", dtype)  # [d_sae, d_in]
        self.bias = _cast(tensors, "encoder.bias", dtype)
        self.directions = _cast(tensors, "W_dec", dtype)
        self.b_dec = _cast(tensors, "b_dec", dtype)
        self.k = int(cfg["k"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x.to(torch.float32) - self.b_dec) @ self.weight.T + self.bias)
        return _topk_then_relu(pre, self.k)


def read_reference_sae(sae_dir: Path, layer: int, dtype: torch.dtype, k: int | None = None) -> ReferenceSAE:
    """The SAE of `layer` in whichever published layout sae_dir has (read here, independently
    of the server's loaders). A Qwen-Scope release has no config.json: its k is `k` (the caller
    reads it off the repo name)."""
    from safetensors.torch import load_file

    if k is not None:  # a Qwen-Scope release
        return QwenScopeSAE(torch.load(sae_dir / f"layer{layer}.sae.pt", weights_only=True), k, dtype)
    if (sae_dir / "config.json").is_file():  # Qwen-Scope
        config = json.loads((sae_dir / "config.json").read_text())
        return QwenScopeSAE(torch.load(sae_dir / f"layer{layer}.sae.pt", weights_only=True), int(config["k"]), dtype)
    saelens = sae_dir / f"blocks.{layer}.hook_resid_post"
    if (saelens / "sae_weights.safetensors").is_file():
        cfg = json.loads((saelens / "cfg.json").read_text())
        return SAELensSAE(cfg, load_file(str(saelens / "sae_weights.safetensors")), dtype)
    sparsify = sae_dir / f"layers.{layer}"
    cfg = json.loads((sparsify / "cfg.json").read_text())
    return SparsifySAE(cfg, load_file(str(sparsify / "sae.safetensors")), dtype)


def _coefficient(feat: Feature, f_i: torch.Tensor) -> torch.Tensor:
    """How far to move along d_i, per position, for one feature."""
    if feat.mode == "add":
        return torch.full_like(f_i, feat.value)
    if feat.mode == "clamp":
        return feat.value - f_i
    if feat.mode == "ablate":
        return -f_i
    return (feat.value - 1.0) * f_i  # scale


class ReferenceModel:
    """HF Qwen3 / Qwen3.5 (dense or MoE) model + tokenizer + lazily loaded SAEs (Qwen-Scope, SAELens or
    sparsify), on CPU."""

    def __init__(self, model, tokenizer, model_dir: Path, sae_dir: Path, sae_k: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.sae_dir = sae_dir
        self.sae_k = sae_k
        self.dtype: torch.dtype = model.dtype
        self._saes: dict[int, ReferenceSAE] = {}

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ SAEs

    def sae(self, layer: int) -> ReferenceSAE:
        """The SAE of `layer`, read from sae_dir on first use (any supported format)."""
        if layer not in self._saes:
            if not 0 <= layer < self.num_layers:
                raise IndexError(f"layer {layer} out of range (model has {self.num_layers})")
            self._saes[layer] = read_reference_sae(self.sae_dir, layer, self.dtype, self.sae_k)
        return self._saes[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.sae(layer).encode(x)

    # ------------------------------------------------------------------ prompts

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a chat prompt with the generation prompt appended (no BOS)."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ forward passes

    @torch.no_grad()
    def forward(
        self,
        token_ids: Sequence[int],
        steering: Iterable[FeatureLike] | None = None,
        apply_to: ApplyTo = "all",
        prompt_len: int | None = None,
        capture: bool = False,
        vectors: Iterable[Vector | Mapping] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Float32 logits [T, vocab] of one sequence, and (if capture) each layer's resid_post.

        Captured residuals [T, d_model] (float32) are taken after steering at that layer.
        `prompt_len` defaults to len(token_ids) (so "generation" then edits nothing).
        """
        if apply_to not in APPLY_TO:
            raise ValueError(f"unknown apply_to {apply_to!r}; expected one of {APPLY_TO}")
        features = [as_feature(s) for s in steering or ()]
        vecs = [as_vector(v) for v in vectors or ()]
        for f in features:
            self.sae(f.layer)  # load and validate before any hook is installed
        length = len(token_ids)
        mask = _position_mask(length, len(token_ids) if prompt_len is None else prompt_len, apply_to)
        captured: list[torch.Tensor] = [torch.empty(0)] * self.num_layers
        gates: dict[When, torch.Tensor] = {}  # filled at each gate's layer, read at its edits'
        handles = []
        for layer in range(self.num_layers):
            layer_feats = [f for f in features if f.layer == layer]
            layer_vecs = [v for v in vecs if v.layer == layer]
            layer_gates = {e.when for e in (*features, *vecs) if e.when is not None and e.when.layer == layer}
            if layer_feats or layer_vecs or layer_gates or capture:
                hook = self._make_hook(layer, layer_feats, mask, captured if capture else None, layer_gates, gates,
                                       layer_vecs)
                handles.append(self.layers[layer].register_forward_hook(hook))
        try:
            ids = torch.tensor([list(token_ids)], dtype=torch.long)
            out = self.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return out.logits[0].to(torch.float32), captured if capture else []

    def _make_hook(self, layer: int, feats: list[Feature], mask: torch.Tensor, captured: list | None,
                   layer_gates: set[When] = frozenset(), gates: dict | None = None, vecs: Sequence[Vector] = ()):
        """Forward hook on decoder layer `layer`: evaluate the gates read here, then edit its
        output (the residual stream)."""

        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, d]
            for gate in layer_gates:  # on the stream as it arrived, before this layer's edits
                gates[gate] = gate.passes(self.sae(layer).encode(hidden[0])[..., gate.index])
            if feats or vecs:
                x = hidden[0]
                delta = self.sae(layer).steering_delta(x, feats, gates) if feats else torch.zeros(x.shape)
                for vec in vecs:
                    gate = gates[vec.when].to(torch.float32).unsqueeze(-1) if vec.when is not None else 1.0
                    delta = delta + vec.delta(x) * gate
                edited = (x.to(torch.float32) + delta).to(hidden.dtype)
                edited = torch.where(mask.unsqueeze(-1), edited, x).unsqueeze(0)
                hidden = edited
            if captured is not None:
                captured[layer] = hidden[0].to(torch.float32).clone()
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return hook

    def residual_stream(self, token_ids: Sequence[int]) -> list[torch.Tensor]:
        """Unsteered resid_post of every layer, float32 [T, d_model] each."""
        return self.forward(token_ids, capture=True)[1]

    @torch.no_grad()
    def greedy_generate(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        steering: Iterable[FeatureLike] | None = None,
        apply_to: ApplyTo = "all",
        stop_token_ids: Iterable[int] = (),
        vectors: Iterable[Vector | Mapping] | None = None,
    ) -> tuple[list[int], list[float]]:
        """Greedy continuation and the log-probability of each chosen token.

        Full recomputation every step; logprobs = log_softmax of the float32 logits. Generation
        stops early only on `stop_token_ids` (empty by default, like `ignore_eos`).
        """
        features = [as_feature(s) for s in steering or ()]
        vecs = [as_vector(v) for v in vectors or ()]
        stops = set(stop_token_ids)
        prompt = list(prompt_token_ids)
        seq = list(prompt)
        tokens: list[int] = []
        logprobs: list[float] = []
        for _ in range(max_tokens):
            logits, _ = self.forward(seq, features, apply_to, prompt_len=len(prompt), vectors=vecs)
            last = torch.log_softmax(logits[-1], dim=-1)
            token = int(torch.argmax(last))
            tokens.append(token)
            logprobs.append(float(last[token]))
            seq.append(token)
            if token in stops:
                break
        return tokens, logprobs


def _position_mask(length: int, prompt_len: int, apply_to: ApplyTo) -> torch.Tensor:
    """Bool [T]: which positions are edited."""
    pos = torch.arange(length)
    if apply_to == "prompt":
        return pos < prompt_len
    if apply_to == "generation":
        return pos >= prompt_len
    return torch.ones(length, dtype=torch.bool)


# Vision + text wrappers: the reference runs their text model (transformers loads it from the
# wrapper's checkpoint, dropping the `language_model` prefix), as vLLM does with
# --language-model-only.
_TEXT_MODEL_OF = {
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}


def load_reference(
    model_dir: str | Path,
    sae_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    sae_k: int | None = None,
) -> ReferenceModel:
    """Load the checkpoint's causal LM (CPU, eval, eager attention; Qwen3, Qwen3 MoE, Qwen3.5
    or Qwen3.5 MoE, a wrapper's text model) and its tokenizer from model_dir. `sae_k`: the k of
    a Qwen-Scope release in sae_dir (which has no config.json)."""
    import transformers
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    architecture = json.loads((model_dir / "config.json").read_text()).get("architectures", ["Qwen3_5ForCausalLM"])[0]
    model_class = getattr(transformers, _TEXT_MODEL_OF.get(architecture, architecture))
    model = model_class.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ReferenceModel(model, tokenizer, model_dir, Path(sae_dir) if sae_dir else model_dir / "sae", sae_k)
