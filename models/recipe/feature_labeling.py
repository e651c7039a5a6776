"""Label every SAE feature of the default model through `steerserve dashboards`, the labeller users
have (server/steerserve/analysis/dashboards.py), with each document's language as its group.

The labelling text is documents in a seeded random order up to LABEL_TOKENS tokens, so it spans
every collection. A private engine builds the dashboards of layers 1-3; `--labels-out` writes
`sae/labels.jsonl` (`{"layer", "index", "label", "description"}` per line): the strongest language
feature per layer is labelled by the language's name when it fires on at least 30% of that
language's word pieces and at most 10% of every other's (so `/v1/features/search?q=German` finds
it first), other features by their top tokens. The numbers behind the language features go to
the build report (`language_features`, read by language_steering.py and the README's tables).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from models.recipe.corpus import LANGUAGE_NAMES, LANGUAGES, Document

LABEL_TOKENS = 300_000  # tokens of labelling text, spread over the languages as in the corpus
LAYERS = (1, 2, 3)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def labelling_documents(docs: list[Document], tok, max_tokens: int = LABEL_TOKENS) -> list[Document]:
    """Documents in a seeded random order until they hold `max_tokens` tokens (each counted
    with the <|endoftext|> that ends it)."""
    chosen = random.Random(1).sample(docs, len(docs))
    kept, tokens = [], 0
    for doc, enc in zip(chosen, tok.encode_batch([d.text for d in chosen])):
        kept.append(doc)
        tokens += len(enc.ids) + 1
        if tokens >= max_tokens:
            break
    return kept


def write_labels(model_dir: Path, docs: list[Document], work: Path, log: Callable[[str], None]) -> dict:
    """Build the dashboards of the labelling text on a private engine, write sae/labels.jsonl
    and return the build report's labelling numbers."""
    from tokenizers import Tokenizer

    from steerserve.analysis import dashboards
    from steerserve.analysis.dashboard_store import DashboardStore

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    chosen = labelling_documents(docs, tok)
    work.mkdir(parents=True, exist_ok=True)
    data, db = work / "labelling.jsonl", work / "dashboards.db"
    data.write_text("".join(json.dumps({"text": d.text, "language": LANGUAGE_NAMES[d.language]}, ensure_ascii=False)
                            + "\n" for d in chosen), encoding="utf-8")
    db.unlink(missing_ok=True)  # labels describe the SAEs just built: never resume an older run
    log(f"labelling {len(chosen)} documents through `steerserve dashboards`")
    started = time.monotonic()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    status = dashboards.main(["--data", str(data), "--group-field", "language",
                              "--layers", ",".join(map(str, LAYERS)), "--output", str(db),
                              "--labels-out", str(model_dir / "sae" / "labels.jsonl"),
                              "--server-log", str(work / "server.log"),
                              str(model_dir), "--config", str(CONFIG), "--sae", str(model_dir / "sae")])
    if status != 0:
        raise RuntimeError(f"steerserve dashboards failed ({status}); see {work / 'server.log'}")
    store = DashboardStore(db)
    report = {"documents": len(chosen), "tokens": store.tokens()[LAYERS[0]], "language_features": {},
              "seconds": round(time.monotonic() - started, 1)}
    for layer in LAYERS:
        found = dashboards.group_features(store, layer)
        report["language_features"][str(layer)] = {lang: {
            "index": v["index"], "qualifies": v["qualifies"], "rate_in_language": v["rate_in_group"],
            "max_rate_elsewhere": v["max_rate_elsewhere"], "rates": {c: v["rates"][LANGUAGE_NAMES[c]] for c in LANGUAGES},
            "mean_activation": v["mean_activation"]} for lang in LANGUAGES for v in [found[LANGUAGE_NAMES[lang]]]}
        log(f"layer {layer}: language features " + ", ".join(
            f"{name} #{v['index']} ({v['rate_in_group']:.0%} vs <= {v['max_rate_elsewhere']:.0%}"
            f"{'' if v['qualifies'] else ', does not qualify'})" for name, v in found.items()))
    store.close()
    report["labelled_features"] = sum(1 for _ in (model_dir / "sae" / "labels.jsonl").open())
    return report
