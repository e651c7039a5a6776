"""Rebuild the shipped default model from scratch: corpus, tokenizer, language model, SAEs, labels.

    make default-model            (python -m models.recipe.build OUT_DIR [--work-dir DIR])

It needs the `[build]` extra (torch, transformers, tokenizers) and is not part of the installed
package.

Deterministic for a given torch version and thread count (every random choice is seeded). The
work directory keeps the downloaded packages and the trained language model, so a rerun that
only changes the SAE or labelling stage skips the long training; `--only-labels` relabels the
SAEs already in OUT_DIR (through `steerserve dashboards`) and updates the report's labels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from models.recipe.chatml_tokenizer import save_tokenizer, train_tokenizer
from models.recipe import corpus
from models.recipe import language_model
from models.recipe.qwen35_checkpoint import save_checkpoint, text_config

TOKENIZER_VOCAB = 4096
REPORT_FILE = "build_report.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_language_model(work: Path, settings: language_model.TrainSettings) -> dict:
    """Tokenizer and model into work/lm; returns the training numbers."""
    lm_dir = work / "lm"
    report_path = lm_dir / REPORT_FILE
    if report_path.is_file():
        log(f"reusing the language model in {lm_dir}")
        return json.loads(report_path.read_text())
    started = time.monotonic()
    docs = corpus.read_documents(corpus.download_packages(work / "debs"))
    train_docs = [d for d in docs if not d.held_out]
    held_docs = [d for d in docs if d.held_out]
    tok = train_tokenizer([d.text for d in train_docs], TOKENIZER_VOCAB)
    train_stream = language_model.token_stream(train_docs, tok, settings)
    held_stream = language_model.token_stream(held_docs, tok, settings)
    log(f"corpus: {len(docs)} documents, {len(train_stream)} training tokens, {len(held_stream)} held out")
    shape = language_model.ModelShape()
    config = text_config(shape, tok, shape.max_positions)
    model = language_model.new_model(config, settings.seed)

    def progress(step: int, loss: float, elapsed: float) -> None:
        if step % 50 == 0 or step == settings.steps - 1:
            log(f"step {step}/{settings.steps} loss {loss:.3f} ({elapsed:.0f} s)")

    language_model.train(model, train_stream, settings, progress)
    trained_s = time.monotonic() - started
    model = model.to(torch.bfloat16).to(torch.float32)  # measure what is served: bf16 weights
    report = {
        "documents": {lang: sum(d.language == lang for d in docs) for lang in corpus.LANGUAGES},
        "corpus_characters": sum(len(d.text) for d in docs),
        "training_tokens": len(train_stream),
        "held_out_tokens": len(held_stream),
        "tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_settings": dataclasses.asdict(settings),
        "held_out_loss": language_model.mean_loss(model, held_stream, settings.seq_len),
        "unigram_loss": language_model.unigram_loss(train_stream, held_stream, TOKENIZER_VOCAB),
        "training_seconds": round(trained_s, 1),
    }
    lm_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, lm_dir)
    save_checkpoint(config, {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
                    lm_dir)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"held-out loss {report['held_out_loss']:.3f} nats vs unigram {report['unigram_loss']:.3f}")
    return report


def relabel(out: Path, work: Path) -> Path:
    """Only the labelling stage, on the model and SAEs in `out`."""
    from models.recipe import feature_labeling

    docs = corpus.read_documents(corpus.download_packages(work / "debs"))
    report = json.loads((out / REPORT_FILE).read_text())
    report["labels"] = feature_labeling.write_labels(out, docs, work / "labels", log)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out


def build(out: Path, work: Path) -> Path:
    settings = language_model.TrainSettings()
    lm_report = build_language_model(work, settings)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copy2(work / "lm" / name, out / name)
    from models.recipe import feature_labeling
    from models.recipe import sae_training

    docs = corpus.read_documents(corpus.download_packages(work / "debs"))
    sae_report = sae_training.train_saes(out, docs, log)
    label_report = feature_labeling.write_labels(out, docs, work / "labels", log)
    report = {"language_model": lm_report, "saes": sae_report, "labels": label_report}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m models.recipe.build", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--work-dir", type=Path, default=Path(".state/default-model-work"))
    parser.add_argument("--only-labels", action="store_true", help="relabel the SAEs already in OUT_DIR")
    args = parser.parse_args(argv)
    started = time.monotonic()
    (relabel if args.only_labels else build)(args.out_dir, args.work_dir)
    log(f"built {args.out_dir} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
