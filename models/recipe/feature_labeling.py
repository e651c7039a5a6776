"""Label every SAE feature of the default model automatically, from what it fires on.

For each feature: how often it fires, on which languages (the corpus knows each document's
language), its typical activation, the tokens that carry most of its activation and its
top-activating contexts. A feature that fires on most tokens of one language and rarely on the
others is a language feature; the strongest one per language and layer is labelled by the
language's name (also when it fires on only 30-50% of the language's word pieces: its
description gives the rates), so `/v1/features/search?q=German` finds it first.

Output: `sae/labels.jsonl` in the `--feature-labels` format (`{"layer", "index", "label",
"description"}` per line) and the numbers behind the language features for the build report.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.recipe.corpus import LANGUAGE_NAMES, LANGUAGES, Document
from models.recipe.sae_training import SAE_LAYERS, encode, load_model, residual_streams

LABEL_TOKENS = 300_000  # tokens of labelling text, spread over the languages as in the corpus
WINDOW = 256
LANGUAGE_FEATURE_MIN_RATE = 0.5  # fires on at least this share of its language's tokens
LANGUAGE_FEATURE_MAX_OTHER = 0.1  # and on at most this share of every other language's
LANGUAGE_LABEL_MIN_RATE = 0.3  # the best candidate is still labelled by the language's name
TOP_CONTEXTS = 3
# Tokens without a letter (punctuation, digits, whitespace, specials) belong to no language: a
# language's tokens are its word pieces.
NO_LANGUAGE = len(LANGUAGES)


@dataclass
class LabellingText:
    ids: torch.Tensor  # [tokens]
    language: torch.Tensor  # [tokens] index into LANGUAGES, or NO_LANGUAGE


def labelling_text(docs: list[Document], tok, max_tokens: int = LABEL_TOKENS) -> LabellingText:
    """Documents in a seeded random order packed back to back (each ended by <|endoftext|>), so
    the sample spans every collection; each word piece carries its document's language."""
    eot = tok.token_to_id("<|endoftext|>")
    chosen = random.Random(1).sample(docs, len(docs))
    ids: list[int] = []
    langs: list[int] = []
    has_letter = [any(c.isalpha() for c in tok.decode([i])) for i in range(tok.get_vocab_size())]
    for doc, enc in zip(chosen, tok.encode_batch([d.text for d in chosen])):
        piece = enc.ids + [eot]
        ids.extend(piece)
        lang = LANGUAGES.index(doc.language)
        langs.extend(lang if has_letter[t] else NO_LANGUAGE for t in piece)
        if len(ids) >= max_tokens:
            break
    n = min(len(ids), max_tokens) // WINDOW * WINDOW
    return LabellingText(torch.tensor(ids[:n]), torch.tensor(langs[:n]))


@dataclass
class FeatureStats:
    fires_by_language: torch.Tensor  # [d_sae, languages + 1]
    tokens_by_language: torch.Tensor  # [languages + 1]
    activation_sum: torch.Tensor  # [d_sae]
    mass_by_token: torch.Tensor  # [vocab, d_sae]: summed activation per token id
    top_values: torch.Tensor  # [TOP_CONTEXTS, d_sae]
    top_positions: torch.Tensor  # [TOP_CONTEXTS, d_sae]

    @property
    def rates(self) -> torch.Tensor:
        """Share of each language's word pieces on which each feature fires, [d_sae, languages]."""
        return (self.fires_by_language / self.tokens_by_language.clamp(min=1))[:, :NO_LANGUAGE]


def feature_stats(sae: dict[str, torch.Tensor], k: int, x: torch.Tensor, text: LabellingText,
                  vocab_size: int) -> FeatureStats:
    d_sae = sae["W_enc"].shape[0]
    n_lang = len(LANGUAGES) + 1  # and NO_LANGUAGE
    stats = FeatureStats(torch.zeros(d_sae, n_lang), torch.bincount(text.language, minlength=n_lang).float(),
                         torch.zeros(d_sae), torch.zeros(vocab_size, d_sae),
                         torch.full((TOP_CONTEXTS, d_sae), -1.0), torch.zeros(TOP_CONTEXTS, d_sae, dtype=torch.long))
    offset = 0
    with torch.no_grad():
        for chunk in x.split(8192):
            f = encode(sae, chunk, k)
            rows = slice(offset, offset + len(chunk))
            lang_onehot = torch.nn.functional.one_hot(text.language[rows], n_lang).float()
            stats.fires_by_language += (f > 0).float().T @ lang_onehot
            stats.activation_sum += f.sum(0)
            stats.mass_by_token.index_add_(0, text.ids[rows], f)
            values, idx = f.topk(min(TOP_CONTEXTS, len(f)), dim=0)
            merged_v = torch.cat([stats.top_values, values])
            merged_p = torch.cat([stats.top_positions, idx + offset])
            best = merged_v.topk(TOP_CONTEXTS, dim=0).indices
            stats.top_values = merged_v.gather(0, best)
            stats.top_positions = merged_p.gather(0, best)
            offset += len(chunk)
    return stats


def language_features(stats: FeatureStats) -> dict[str, dict]:
    """Per language, its strongest candidate language feature and whether it qualifies: fires
    on >= 50% of its word pieces and <= 10% of every other language's; ranked by the gap."""
    rates = stats.rates
    found = {}
    for li, lang in enumerate(LANGUAGES):
        others = torch.cat([rates[:, :li], rates[:, li + 1:]], dim=1).max(dim=1).values
        gap = rates[:, li] - others
        ok = (rates[:, li] >= LANGUAGE_FEATURE_MIN_RATE) & (others <= LANGUAGE_FEATURE_MAX_OTHER)
        best = int(gap.argmax())
        found[lang] = {
            "index": best,
            "qualifies": bool(ok[best]),
            "rate_in_language": round(float(rates[best, li]), 3),
            "max_rate_elsewhere": round(float(others[best]), 3),
            "rates": {l: round(float(rates[best, j]), 3) for j, l in enumerate(LANGUAGES)},
            "mean_activation": round(float(stats.activation_sum[best] / stats.fires_by_language[best].sum().clamp(min=1)), 3),
        }
    return found


def _shown(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t") or "?"


def describe(index: int, stats: FeatureStats, text: LabellingText, tok, language_of: dict[int, str]) -> dict | None:
    """One labels.jsonl record, or None for a feature that never fired."""
    fires = stats.fires_by_language[index]
    total = float(fires.sum())
    if total == 0:
        return None
    rates = stats.rates[index]
    share = fires[:NO_LANGUAGE] / fires[:NO_LANGUAGE].sum().clamp(min=1)
    top_tokens = stats.mass_by_token[:, index].topk(3).indices.tolist()
    words = [_shown(tok.decode([t])) for t in top_tokens]
    dominant = int(rates.argmax())
    # "dominant language" compares rates, so a larger language in the sample does not win by size
    normalized = rates / rates.sum()
    if index in language_of:
        label = LANGUAGE_NAMES[language_of[index]]
    elif float(rates[dominant]) >= LANGUAGE_FEATURE_MIN_RATE and float(normalized[dominant]) >= 0.8:
        label = f"{LANGUAGE_NAMES[LANGUAGES[dominant]]} text: " + ", ".join(f"'{w}'" for w in words)
    else:
        label = ", ".join(f"'{w}'" for w in words)
        if float(normalized[dominant]) >= 0.8:
            label += f" ({LANGUAGE_NAMES[LANGUAGES[dominant]]})"
    contexts = []
    for value, pos in zip(stats.top_values[:, index].tolist(), stats.top_positions[:, index].tolist()):
        if value <= 0:
            break
        before = tok.decode(text.ids[max(0, pos - 8):pos].tolist())
        at = tok.decode([int(text.ids[pos])])
        contexts.append(f"{before}[[{at}]]".replace("\n", " ")[-60:])
    mean_act = float(stats.activation_sum[index]) / total
    description = (
        f"fires on {total / float(stats.tokens_by_language.sum()):.1%} of tokens, mean activation {mean_act:.2f}; "
        f"rate by language: " + ", ".join(f"{l} {float(rates[j]):.0%}" for j, l in enumerate(LANGUAGES))
        + f" (share of firings: {', '.join(f'{l} {float(share[j]):.0%}' for j, l in enumerate(LANGUAGES))}); "
        + "top contexts: " + " | ".join(contexts)
    )
    return {"label": label, "description": description}


def write_labels(model_dir: Path, docs: list[Document], log: Callable[[str], None]) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = json.loads((model_dir / "sae" / "config.json").read_text())
    text = labelling_text(docs, tok)
    model = load_model(model_dir)
    acts = residual_streams(model, text.ids, SAE_LAYERS)
    records, report = [], {"tokens": len(text.ids), "language_features": {}}
    for layer in SAE_LAYERS:
        sae = torch.load(model_dir / "sae" / f"layer{layer}.sae.pt", weights_only=True)
        stats = feature_stats(sae, config["k"], acts[layer], text, tok.get_vocab_size())
        langs = language_features(stats)
        report["language_features"][str(layer)] = langs
        language_of = {v["index"]: lang for lang, v in langs.items()
                       if v["rate_in_language"] >= LANGUAGE_LABEL_MIN_RATE and v["max_rate_elsewhere"] <= LANGUAGE_FEATURE_MAX_OTHER}
        for index in range(config["d_sae"]):
            record = describe(index, stats, text, tok, language_of)
            if record is not None:
                records.append({"layer": layer, "index": index, **record})
        log(f"layer {layer}: language features " + ", ".join(
            f"{lang} #{v['index']} ({v['rate_in_language']:.0%} vs <= {v['max_rate_elsewhere']:.0%}"
            f"{'' if v['qualifies'] else ', does not qualify'})" for lang, v in langs.items()))
    path = model_dir / "sae" / "labels.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    report["labelled_features"] = len(records)
    return report
