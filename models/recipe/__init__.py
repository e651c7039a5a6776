"""The shipped default model, rebuilt from scratch by `make default-model` (models/recipe/build.py):
corpus (Debian's fortunes) -> tokenizer -> small Qwen3.5 -> TopK SAEs -> automatic labels."""
