"""The one prompt-token counter (steerserve.prompt_tokens) on text prompts and token ids, with the
tiny model's real tokenizer: what it counts, and which bound refuses what. Chat prompts go
through the server's own /tokenize and are covered on the shared server (test_features.py,
test_traces.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from steerserve.errors import APIError
from steerserve.limits import Limits
from steerserve.prompt_tokens import prompt_token_ids

MAX_TOKENS = 8  # with the default 32 characters per token: nothing over 256 characters is tokenized


@pytest.fixture(scope="module")
def context(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return SimpleNamespace(limits=Limits(), engine=SimpleNamespace(get_tokenizer=lambda: tokenizer),
                           tokenizer=tokenizer)


def count(context, prompt):
    return asyncio.run(prompt_token_ids(context, {"prompt": prompt}, "prompt", MAX_TOKENS))


def refusal(context, prompt) -> APIError:
    with pytest.raises(APIError) as refused:
        count(context, prompt)
    assert (refused.value.status, refused.value.param) == (400, "prompt")
    return refused.value


def test_a_text_is_split_by_the_served_tokenizer(context):
    assert count(context, "the weather") == context.tokenizer.encode("the weather") == [656, 723]


def test_token_ids_are_their_own_count_and_other_prompts_are_left_to_vllm(context):
    assert count(context, [5, 6, 7]) == [5, 6, 7]
    assert count(context, [True, 2]) is None and count(context, {"a": 1}) is None and count(context, 3) is None


def test_characters_are_counted_as_written(context):
    """100 CJK characters are 100 characters (as JSON escapes, 600 would pass the 256 bound):
    they are tokenized, and refused for their 300 tokens."""
    error = refusal(context, "天" * 100)
    assert (error.code, error.message) == ("too_many_tokens", f"the input has 300 tokens; at most {MAX_TOKENS} fit")
    error = refusal(context, "a" * 257)  # refused before tokenizing
    assert (error.code, error.message) == ("too_many_tokens",
                                           f"the input has 257 characters; at most 256 can fit in {MAX_TOKENS} tokens")


@pytest.mark.parametrize("prompt", ["", []])
def test_an_input_without_tokens_is_refused(context, prompt):
    assert refusal(context, prompt).code == "empty_input"
