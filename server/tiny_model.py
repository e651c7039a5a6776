"""Build a tiny Qwen3.5 text model, its tokenizer and a Qwen-Scope-format SAE set, locally.

No model hub is reachable from development or CI machines, so tests need a checkpoint they can
build in a second that still exercises the real code paths: the architecture vLLM serves for
Qwen3.5 (`Qwen3_5ForCausalLM`: 3 Gated DeltaNet layers + 1 gated full-attention layer, bf16), a
real ChatML tokenizer, and SAE files in the exact published Qwen-Scope layout.

Numerics. Tests compare vLLM's CPU kernels with a plain Hugging Face reference token by token.
Those differ by ~1-2% (relative) in the residual stream, and with random weights the greedy
argmax flips at ~3% of steps. So the weights are a small hand-built circuit (see
`_model_weights`) in which every decision is made from exact token identities and positions
with margins of several logits: unsteered greedy runs match exactly, and SAE steering still
changes the output in predictable ways (`tiny_model_info.json` says how).

Everything comes from `torch.Generator`s seeded from `seed`: same seed, same bytes.

    python -m server.tiny_model OUT_DIR [--seed N] [--force]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from server.chatml_tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from server.qwen35_checkpoint import (
    param_shapes, save_checkpoint, save_qwen_scope_config, save_qwen_scope_layer, text_config,
)

__all__ = ["TinySettings", "SETTINGS", "INFO_FILE", "build_tiny_model", "is_built", "successors"]

MARKER = ".tiny_model_complete"
INFO_FILE = "tiny_model_info.json"  # circuit constants and SAE feature meanings, for tests
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

system: You are a helpful assistant.
user: Can the assistant answer a question from the user?
assistant: Yes. The assistant reads what the user writes and answers.
"""


@dataclasses.dataclass(frozen=True)
class TinySettings:
    """Shapes (REFERENCE.md section 4) and the constants of the hand-built circuit."""

    vocab_size: int = 1024  # the tokenizer is trained to exactly this size
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    full_attention_interval: int = 4  # layer 3 is full attention, layers 0..2 Gated DeltaNet
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 64
    linear_key_heads: int = 1
    linear_value_heads: int = 2
    linear_head_dim: int = 128
    conv_kernel: int = 4
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    # residual stream layout: [token dims | code dims | bias dim]
    token_dims: int = 64
    token_norm: float = 6.3  # |embedding| of every token; deliberately not a round number
    # Constant channel: lets layer 3 build position-only queries, and (being large) dominates every
    # RMSNorm denominator, so norms scale the other dims almost linearly (an ablated token is
    # not re-amplified into a full-size copy) - like the massive-activation dims of real LLMs.
    bias_value: float = 20.0
    mix_gain: float = 0.05  # scale of what layers 0..2 (and the MLPs) write: they perturb, never decide
    # the copy head (layer 3 full attention)
    copy_lag: int = 8  # position i attends to position i - copy_lag
    copy_amplitude: float = 3.5  # norm of the code it writes; steering strengths near it tie
    attn_sharpness: float = 4.0  # q_norm / k_norm scale; attention scores ~ 8 * sharpness**2
    rope_weights: tuple[float, ...] = (0.4, 0.4, 0.2)  # share of each rotary frequency in q.k
    # unembedding
    self_weight: float = 0.2  # current-token path relative to the copy path (fallback only)
    logit_scale: float = 9.0  # top logit ~12 (the bias dim makes normalised states small)
    lm_head_noise: float = 0.01
    default_weight: float = 0.03  # the most frequent token, via the bias dim: wins when all else cancels
    # SAE set
    d_sae: int = 1024
    sae_k: int = 16
    sae_token_features: int = 512  # features [0, 512): a frequent token's embedding direction
    sae_code_features: int = 512  # features [512, 1024): a frequent token's copy code
    # (any features beyond these two blocks would be random unit directions; random directions
    # push the model into Gaussian-like argmax decisions, i.e. near-ties, so there are none)
    sae_enc_noise: float = 0.02
    sae_b_enc: float = -0.5


SETTINGS = TinySettings()


def is_built(out_dir: str | Path, seed: int | None = None) -> bool:
    """True when out_dir holds a finished build (marker written last) of this very builder
    version, and of `seed` if given; an edit to this module therefore triggers a rebuild."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    stamp = json.loads(marker.read_text())
    return stamp.get("build") == _build_id() and (seed is None or stamp.get("seed") == seed)


def _build_id() -> str:
    """Hash of this file and the modules that write its files: builds made by an older builder are stale."""
    here = Path(__file__).parent
    sources = (Path(__file__), here / "chatml_tokenizer.py", here / "qwen35_checkpoint.py")
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write model, tokenizer and SAE files into `out_dir`; no-op if already built for `seed`.

    Files are produced in a private temporary directory beside out_dir and moved in, marker
    last, so a concurrent reader never sees a half-written build as complete.
    """
    out = Path(out_dir)
    if not force and is_built(out, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_build(tmp, out.name, seed)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _make_readable(path: Path) -> None:
    """mkdtemp/safetensors create owner-only files; builds are shared (containers, other users)."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def _write_build(tmp: Path, name: str, seed: int) -> None:
    s = SETTINGS
    tokenizer = train_tokenizer([CORPUS] * 4, s.vocab_size)
    save_tokenizer(tokenizer, tmp)
    ranking = _corpus_ranking(tokenizer)
    state = _model_weights(s, seed, default_token=int(ranking[0]))
    save_checkpoint(text_config(s, tokenizer), state, tmp)
    features = _save_saes(s, state, tmp, name, seed, ranking)
    _save_info(s, seed, int(ranking[0]), features, tmp)
    (tmp / MARKER).write_text(json.dumps({"seed": seed, "build": _build_id()}) + "\n")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished files into out (replacing an older build's), the marker last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        _make_readable(item)
        os.replace(item, dest)


# ----------------------------------------------------------------------------- model


def _init_tensor(name: str, shape: tuple[int, ...], s: TinySettings, g: torch.Generator) -> torch.Tensor:
    """Generic random init; the rule depends only on the name, so the order never matters."""
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
    weight = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    if name.endswith(("out_proj.weight", "down_proj.weight", "o_proj.weight")):
        weight = weight * s.mix_gain  # writes into the residual stream stay small
    return weight


def _model_weights(s: TinySettings, seed: int, default_token: int) -> dict[str, torch.Tensor]:
    """All checkpoint tensors in bfloat16: random mixing layers plus the hand-built circuit.

    Circuit (why greedy decoding is robust to kernel-level noise): every decision is made from
    exact token identities and positions, with wide margins, never from an argmax over
    near-Gaussian random scores.
      - Residual layout: token dims (each token's embedding, all of norm `token_norm`), code dims
        (written by layer 3), one bias dim held at `bias_value`.
      - Layers 0..2 (Gated DeltaNet + MLP) are random but write only `mix_gain`-sized vectors.
      - Layer 3 attention is a copy head: position-only queries/keys (from the bias dim, via
        RoPE) attend to position i - copy_lag; V/O copy that token into the code dims.
      - lm_head reads the code dims (copied token u -> next[u], see `successors`) and, weaker,
        the token dims (current token t -> next[t], the fallback when nothing is copied), and
        the bias dim (default_token, the last resort when steering cancels both).
    """
    rng = _Rng(seed)
    state = {name: _init_tensor(name, shape, s, rng.gen(name)) for name, shape in param_shapes(s).items()}
    state["model.embed_tokens.weight"] = _embeddings(s, rng.gen("embeddings"))
    codes = _copy_head(s, state, rng.gen("copy_head"))
    state["lm_head.weight"] = _lm_head(s, state["model.embed_tokens.weight"], codes, rng, default_token)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


class _Rng:
    """Independent generators per purpose, all derived from one seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def gen(self, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(_name_seed(self.seed, purpose))

    def perm(self, purpose: str, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen(purpose))


def _layout(s: TinySettings) -> tuple[slice, slice, int]:
    """(token dims, code dims, bias dim) of the residual stream."""
    return slice(0, s.token_dims), slice(s.token_dims, s.hidden_size - 1), s.hidden_size - 1


def _embeddings(s: TinySettings, g: torch.Generator) -> torch.Tensor:
    """Well-spread token directions of equal norm (so no token is louder), plus the bias channel."""
    token, _, bias = _layout(s)
    emb = torch.zeros(s.vocab_size, s.hidden_size)
    emb[:, token] = _spread_rows(torch.randn(s.vocab_size, s.token_dims, generator=g)) * s.token_norm
    emb[:, bias] = s.bias_value
    return emb


def _spread_rows(rows: torch.Tensor, steps: int = 60, lr: float = 0.5, power: int = 8) -> torch.Tensor:
    """Unit rows pushed apart: max |cos| between two tokens ~0.23 instead of ~0.55 at random.

    Overlap between token directions (and so between their copy codes) is what lets a sum of
    unrelated contributions tie with the intended winner; halving the worst overlap keeps
    steered runs away from ties too. A few dozen steps of repulsion on the largest overlaps.
    """
    x = rows / rows.norm(dim=1, keepdim=True)
    for _ in range(steps):
        gram = x @ x.T
        gram.fill_diagonal_(0.0)
        push = (gram / gram.abs().max()).pow(power - 1)
        x = x - lr * (push @ x) / push.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
        x = x / x.norm(dim=1, keepdim=True)
    return x


def _rope_inv_freq(s: TinySettings) -> torch.Tensor:
    """Rotary frequencies as HF/vLLM compute them (NeoX pairs (k, k + rot/2))."""
    rot = int(s.head_dim * s.partial_rotary_factor)
    return 1.0 / (s.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))


def _copy_head(s: TinySettings, state: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """Make layer 3 attention copy the token at lag `copy_lag`; return unit codes [vocab, code dims].

    q and k read only the bias dim, so after q_norm/k_norm they are constant vectors; RoPE then
    makes q.k = A * sum_k w_k cos(w_k (i - j - lag)), peaked at j = i - lag whatever the content.
    The output gate is zeroed (sigmoid(0) = 0.5 for both heads, whose outputs O sums).
    """
    token, code, bias = _layout(s)
    a = f"model.layers.{s.num_layers - 1}.self_attn."
    d, hd = s.hidden_size, s.head_dim
    inv_freq = _rope_inv_freq(s)
    half = len(inv_freq)
    weights = torch.tensor(s.rope_weights, dtype=torch.float64)
    k_vec = torch.zeros(hd, dtype=torch.float64)
    q_vec = torch.zeros(hd, dtype=torch.float64)
    for f, w in enumerate(weights):
        phase = -float(inv_freq[f]) * s.copy_lag
        k_vec[f] = w.sqrt()
        q_vec[f], q_vec[f + half] = w.sqrt() * math.cos(phase), w.sqrt() * math.sin(phase)
    q_proj = torch.zeros(s.num_heads, 2, hd, d)  # per head: [query rows | output-gate rows]
    q_proj[:, 0, :, bias] = q_vec.float()
    state[a + "q_proj.weight"] = q_proj.reshape(s.num_heads * 2 * hd, d)
    k_proj = torch.zeros(s.num_kv_heads * hd, d)
    k_proj[:, bias] = k_vec.float().repeat(s.num_kv_heads)
    state[a + "k_proj.weight"] = k_proj
    state[a + "q_norm.weight"] = torch.full((hd,), s.attn_sharpness - 1.0)
    state[a + "k_norm.weight"] = torch.full((hd,), s.attn_sharpness - 1.0)
    # V: rotate the (normalised) token dims into head space; O: rotate into the code dims.
    v_rot = torch.linalg.qr(torch.randn(hd, s.token_dims, generator=g))[0]
    o_rot = torch.linalg.qr(torch.randn(hd, hd, generator=g))[0][: code.stop - code.start]
    v_proj = torch.zeros(s.num_kv_heads * hd, d)
    v_proj[:, token] = v_rot.repeat(s.num_kv_heads, 1)
    state[a + "v_proj.weight"] = v_proj
    # RMSNorm scales token dims by sqrt(d) / |x|; both heads contribute 0.5 * V.
    input_norm = math.sqrt(d) * s.token_norm / math.sqrt(s.token_norm**2 + s.bias_value**2)
    gain = s.copy_amplitude / input_norm
    o_proj = torch.zeros(d, s.num_heads * hd)
    for h in range(s.num_heads):
        o_proj[code, h * hd : (h + 1) * hd] = o_rot * gain
    state[a + "o_proj.weight"] = o_proj
    codes = state["model.embed_tokens.weight"][:, token] @ v_rot.T @ o_rot.T
    return codes / codes.norm(dim=1, keepdim=True)


def _lm_head(s: TinySettings, emb: torch.Tensor, codes: torch.Tensor, rng: _Rng, default_token: int) -> torch.Tensor:
    """Row next[u] reads u's copy code (strongly) and u's embedding (weakly).

    So the output is next[token copied from copy_lag back]; when nothing is copied (e.g. it was
    ablated) it is next[current token]. Both paths share one successor map, so when a large edit
    makes token u dominate both the copied and the current position they agree instead of tying.
    """
    token, code, _ = _layout(s)
    successor = successors(s, rng.seed)
    head = torch.randn(s.vocab_size, s.hidden_size, generator=rng.gen("lm_head")) * s.lm_head_noise
    head[:, code] += torch.zeros(s.vocab_size, code.stop - code.start).index_add_(0, successor, codes)
    reads_token = emb[:, token] / s.token_norm * s.self_weight
    head[:, token] += torch.zeros(s.vocab_size, s.token_dims).index_add_(0, successor, reads_token)
    head[:, -1] = 0.0  # only the default token reads the bias channel
    head[default_token, -1] = s.default_weight
    head = head * s.logit_scale
    _silence_special_tokens(head)
    return head


def successors(s: TinySettings, seed: int) -> torch.Tensor:
    """next[u] for every token u: a permutation of the ordinary tokens, specials map to ordinary
    ones, so the model's output is never a special token and no input goes silent."""
    rng, n_special = _Rng(seed), len(SPECIAL_TOKENS)
    ordinary = rng.perm("successor", s.vocab_size - n_special) + n_special
    extra = rng.perm("special_successor", s.vocab_size - n_special)[:n_special] + n_special
    return torch.cat([extra, ordinary])


def _silence_special_tokens(lm_head: torch.Tensor) -> None:
    """Zero rows for the ChatML specials: the model never emits them (not even <|im_end|>), so a
    run always lasts max_tokens (finish_reason "length") unless a stop string ends it."""
    lm_head[: len(SPECIAL_TOKENS)] = 0.0


def _name_seed(seed: int, name: str) -> int:
    """Stable per-tensor seed (Python's hash() is salted per process, so not usable)."""
    h = 1469598103934665603
    for byte in f"{seed}:{name}".encode():
        h = ((h ^ byte) * 1099511628211) % (1 << 63)
    return h


# ----------------------------------------------------------------------------- SAEs and info


def _save_saes(
    s: TinySettings, state: dict[str, torch.Tensor], out: Path, name: str, seed: int, ranking: torch.Tensor
) -> list[dict[str, list[int]]]:
    """Qwen-Scope layout: sae/layer{n}.sae.pt (fp32 dicts) plus sae/config.json.

    Returns, per layer, the token ids behind its token features and its code features.
    """
    sae_dir = out / "sae"
    sae_dir.mkdir()
    rng = _Rng(seed)
    directions = _feature_directions(s, state)
    features = []
    for layer in range(s.num_layers):
        token_ids, code_ids = _feature_tokens(s, rng, layer, ranking)
        tensors = _sae_tensors(s, directions, rng.gen(f"sae.{layer}"), token_ids, code_ids)
        save_qwen_scope_layer(sae_dir, layer, tensors)
        features.append({"token_features": token_ids.tolist(), "code_features": code_ids.tolist()})
    save_qwen_scope_config(sae_dir, base_model=name, d_model=s.hidden_size, d_sae=s.d_sae, k=s.sae_k,
                           num_layers=s.num_layers)
    return features


def _corpus_ranking(tok) -> torch.Tensor:
    """Ordinary token ids, most frequent in CORPUS first: features for tokens prompts contain."""
    counts = Counter(tok.encode(CORPUS).ids)
    ids = range(len(SPECIAL_TOKENS), tok.get_vocab_size())
    return torch.tensor(sorted(ids, key=lambda i: (-counts[i], i)))


def _feature_tokens(s: TinySettings, rng: _Rng, layer: int, ranking: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids behind `layer`'s token features and code features (order shuffled per layer)."""
    token_ids = ranking[: s.sae_token_features]
    code_ids = ranking[: s.sae_code_features]
    token_ids = token_ids[rng.perm(f"sae.{layer}.token_features", len(token_ids))]
    code_ids = code_ids[rng.perm(f"sae.{layer}.code_features", len(code_ids))]
    return token_ids, code_ids


def _feature_directions(s: TinySettings, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unit directions a feature can take: each token's embedding and each token's copy code."""
    token, code, _ = _layout(s)
    emb = state["model.embed_tokens.weight"].float()
    tok = torch.zeros(s.vocab_size, s.hidden_size)
    tok[:, token] = emb[:, token]
    a = f"model.layers.{s.num_layers - 1}.self_attn."
    v = state[a + "v_proj.weight"].float()[: s.head_dim, token]  # first KV head
    o = state[a + "o_proj.weight"].float()[code, : s.head_dim]  # first head's slice
    copy = torch.zeros(s.vocab_size, s.hidden_size)
    copy[:, code] = emb[:, token] @ v.T @ o.T
    return {"token": _unit_rows(tok), "code": _unit_rows(copy)}


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True)


def _sae_tensors(
    s: TinySettings, directions: dict[str, torch.Tensor], g: torch.Generator, token_ids: torch.Tensor, code_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Decoder columns = token / copy-code / random unit directions; encoder rows follow them.

    So on real activations the current token's feature fires at ~token_norm, a copied token's
    code feature at ~copy_amplitude (layer 3), and weak ones fill the rest of the top-k.
    """
    n_random = s.d_sae - s.sae_token_features - s.sae_code_features
    random = _unit_rows(torch.randn(n_random, s.hidden_size, generator=g))
    w_dec = torch.cat([directions["token"][token_ids], directions["code"][code_ids], random]).T
    w_enc = w_dec.T + torch.randn(s.d_sae, s.hidden_size, generator=g) * s.sae_enc_noise
    b_enc = torch.full((s.d_sae,), s.sae_b_enc) + torch.randn(s.d_sae, generator=g) * 0.05
    b_dec = torch.randn(s.hidden_size, generator=g) * 0.01
    return {
        "W_enc": w_enc.contiguous(),
        "W_dec": w_dec.contiguous(),
        "b_enc": b_enc.contiguous(),
        "b_dec": b_dec.contiguous(),
    }


def _save_info(s: TinySettings, seed: int, default_token: int, features: list[dict[str, list[int]]], out: Path) -> None:
    """What the circuit does, so tests can predict effects instead of hard-coding token ids."""
    token, code, bias = _layout(s)
    info = {
        "seed": seed,
        "settings": dataclasses.asdict(s),
        "residual_layout": {"token_dims": [token.start, token.stop], "code_dims": [code.start, code.stop], "bias_dim": bias},
        "copy_layer": s.num_layers - 1,
        "copy_lag": s.copy_lag,
        "copy_amplitude": s.copy_amplitude,
        "default_token": default_token,
        "successor": successors(s, seed).tolist(),
        "sae_feature_kinds": {
            "token": [0, s.sae_token_features],
            "code": [s.sae_token_features, s.sae_token_features + s.sae_code_features],
            "random": [s.sae_token_features + s.sae_code_features, s.d_sae],
        },
        "sae_features": features,
    }
    (out / INFO_FILE).write_text(json.dumps(info) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny Qwen3.5 test model and its SAEs.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, seed=args.seed, force=args.force))


if __name__ == "__main__":
    main()
