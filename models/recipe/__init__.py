"""The shipped default model, rebuilt from scratch by `steerserve build-default-model`:
corpus (Debian's fortunes) -> tokenizer -> small Qwen3.5 -> TopK SAEs -> automatic labels."""
