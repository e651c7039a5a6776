"""The server against an independent reference: the Hugging Face model of the same checkpoint
with the SAE applied by a plain PyTorch forward hook (tests/hf_reference.py).

The server runs compiled (torch.compile, vLLM's default), so this also proves steering reaches
every decoded token inside the compiled graph, including generation-only steering whose effect
starts at the second generated token.
"""

from __future__ import annotations

import math
import re

import pytest

from tests.conftest import MODEL_NAME, PROMPT, openai_client, v1_only

MAX_TOKENS = 12
LOGPROB_TOLERANCE = 0.05  # bf16 model, two different kernel stacks


def server_greedy(client, steering, messages=PROMPT):
    extra = {"return_token_ids": True, "ignore_eos": True}
    if steering is not None:
        extra["steering"] = steering
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, extra_body=extra
    )
    choice = response.choices[0]
    return response.model_extra["prompt_token_ids"], list(choice.model_extra["token_ids"]), [
        t.logprob for t in choice.logprobs.content
    ]


def cases(active):
    a1, a2 = active[1], active[2]
    f = lambda layer, index, mode, value=None: {"layer": layer, "index": index, "mode": mode} | (
        {} if value is None else {"value": value})
    return {
        "unsteered": None,
        "add": {"features": [f(1, 3, "add", 8.0)]},
        "add-two-layers": {"features": [f(1, a1[0], "add", -8.0), f(2, 700, "add", 6.0)]},
        "clamp-active-up": {"features": [f(1, a1[0], "clamp", 30.0)]},
        "clamp-inactive-on": {"features": [f(2, 1000 if 1000 not in a2 else 1001, "clamp", 15.0)]},
        "scale": {"features": [f(1, a1[0], "scale", 4.0), f(1, a1[1], "scale", 0.0)]},
        "ablate": {"features": [f(1, a1[0], "ablate"), f(1, a1[1], "ablate"), f(2, a2[0], "ablate")]},
        "generation-only": {"features": [f(1, 3, "add", 10.0)], "apply_to": "generation"},
        "prompt-only": {"features": [f(1, 3, "add", 10.0)], "apply_to": "prompt"},
        "clamp-generation-only": {"features": [f(2, a2[0], "clamp", 25.0)], "apply_to": "generation"},
    }


@pytest.fixture(scope="module")
def server(runner_server):
    """Every test here runs on both of vLLM's model runners (conftest.RUNNERS)."""
    return runner_server


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def all_cases(active_features):
    return cases(active_features)


def assert_server_matches_reference(client, reference, steering, messages=PROMPT) -> list[int]:
    """Same greedy tokens as the reference, logprobs within tolerance; returns the prompt ids."""
    prompt_ids, tokens, logprobs = server_greedy(client, steering, messages)
    assert prompt_ids == reference.chat_prompt_ids(messages)
    features = steering.get("features") if steering else None
    apply_to = steering.get("apply_to", "all") if steering else "all"
    vectors = steering.get("vectors") if steering else None
    ref_tokens, ref_logprobs = reference.greedy_generate(prompt_ids, MAX_TOKENS, features, apply_to, vectors=vectors)
    assert tokens == ref_tokens
    worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
    assert worst < LOGPROB_TOLERANCE, (worst, logprobs, ref_logprobs)
    assert all(math.isfinite(x) for x in logprobs)
    return prompt_ids


@pytest.mark.parametrize("name", list(cases({1: [0, 1], 2: [0, 1]})))
def test_server_matches_plain_pytorch_reference(client, reference, all_cases, name):
    assert_server_matches_reference(client, reference, all_cases[name])


# Longer than three of the shared server's prefill chunks (--max-num-batched-tokens 128 in
# conftest.serve_args), so its prompt is prefilled over several steps and the routing must place
# every chunk's rows by their absolute positions.
LONG_PROMPT = [{"role": "user", "content": " ".join(
    f"Day {i}: the weather report said rain in the north and sun in the south." for i in range(17))}]
CHUNKED_CASES = {
    "unsteered": None,
    "add": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]},
    "prompt-only": {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 10.0}], "apply_to": "prompt"},
    "generation-only": {"features": [{"layer": 2, "index": 700, "mode": "add", "value": 10.0}],
                        "apply_to": "generation"},
    "clamp": {"features": [{"layer": 2, "index": 1000, "mode": "clamp", "value": 15.0}]},
}


@pytest.mark.parametrize("name", list(CHUNKED_CASES))
def test_chunked_prefill_matches_the_reference(server, client, reference, name):
    if name != "prompt-only":
        v1_only(server, "V2 checks chunk routing with prompt-only steering (the case that ends at the last chunk)")
    steering = CHUNKED_CASES[name]
    prompt_ids = assert_server_matches_reference(client, reference, steering, LONG_PROMPT)
    assert len(prompt_ids) > 3 * 128
    if steering is not None:
        steered = server_greedy(client, steering, LONG_PROMPT)[1]
        assert steered != server_greedy(client, None, LONG_PROMPT)[1], "the case does not steer"


def test_reference_cases_really_steer(server, reference, all_cases, client):
    """Guard against a vacuous differential test: each steered case differs from unsteered (on
    V1; V2 matching the same reference tokens steers as much)."""
    v1_only(server, "the cases differ from unsteered whatever the runner")
    _, plain, _ = server_greedy(client, None)
    for name, steering in all_cases.items():
        if steering is None:
            continue
        _, tokens, _ = server_greedy(client, steering)
        assert tokens != plain, name
        if steering.get("apply_to") == "generation":
            assert tokens[0] == plain[0], name


def test_the_server_really_compiled(server):
    """A silently eager server must not pass as the compiled one: vLLM logs its compiled
    artifact (saved after compiling, or loaded from its compile cache). Nor may a server that
    fell back to V1 pass as the V2 one: the worker logs which runner it built."""
    log = server.log_tail(10**7)
    assert ("Using V2 Model Runner" in log) == (server.runner == "v2")
    assert "enforce_eager=False" in log
    assert re.search(r"saved AOT compiled function|Directly load AOT compilation", log)
