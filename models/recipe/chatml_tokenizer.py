"""A byte-level BPE tokenizer in Qwen3.5's shape (ChatML specials, Qwen's pre-tokenizer), trained
locally: no model hub is reachable, so both embedded models train their own."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Same pre-tokenizer as the real Qwen3.5 tokenizer, so `Qwen3_5Tokenizer` (which transformers
# picks for model_type qwen3_5_text) and the raw tokenizer.json agree byte for byte.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                    added_tokens: Sequence[str] = ()):
    """Byte-level BPE trained on `texts`; special tokens take ids 0..; `added_tokens` (text that is
    never split and decodes as written, like Qwen's <think>) take the last ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added_tokens),
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    if tok.get_vocab_size() != vocab_size:  # every model row must decode to a real token
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return tok


def save_tokenizer(tok, out: Path, chat_template: str = CHAT_TEMPLATE, template_file: bool = False) -> None:
    """tokenizer.json plus a Qwen-style tokenizer_config.json; the chat template goes into the
    config, or (template_file, as Qwen3.5 repositories ship it) into chat_template.jinja."""
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen3_5Tokenizer",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": chat_template,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t.special,
            }
            for i, t in sorted(tok.get_added_tokens_decoder().items())
        },
    }
    if template_file:
        (out / "chat_template.jinja").write_text(config.pop("chat_template"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
