"""Direction vectors over real HTTP on the shared compiled server: a vector `add` of value * d_i
is the feature `add` of value; `cap` and `ablate` (alone, gated, beside features) equal the
independent Hugging Face reference (tests/hf_reference.py); a mixed batch of feature, vector and
unsteered requests each equal their solo run. The vectors' 400s are in test_steering_errors.py.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import MODEL_NAME, PROMPT, run_together
from tests.test_differential import assert_server_matches_reference, server_greedy


def b64(v) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def vec(layer, v, mode, value=None, **more):
    return {"layer": layer, "vector": b64(v), "mode": mode} | ({} if value is None else {"value": value}) | more


@pytest.fixture(scope="module")
def directions(reference, active_features) -> dict[str, object]:
    """Decoder rows of the features most active at the prompt's last position (so capping or
    ablating them changes the output), feature 3's row at layer 1, and layer 2's stream at the
    last prompt position with its norm."""
    last2 = reference.residual_stream(reference.chat_prompt_ids(PROMPT))[2][-1]
    a1, a2 = active_features[1], active_features[2]
    return {"top1": reference.sae(1).directions[a1[0]], "top2": reference.sae(2).directions[a2[0]], "a1": a1,
            "d3": reference.sae(1).directions[3], "last2": last2, "norm2": float(last2.norm())}


def cases(d) -> dict[str, dict]:
    """Cases whose greedy choices are clear (see test_differential). Ablating a large share of
    the stream (e.g. the first position's outlier direction) is left out: the server rounds the
    layer's output apart from its residual, and when the edit cancels most of the stream that
    rounding, relative to the residual's size, is far above the reference's single rounding."""
    return {
        "ablate": {"vectors": [vec(1, d["top1"], "ablate")]},
        "ablate-two-layers": {"vectors": [vec(1, d["top1"], "ablate"), vec(2, d["top2"], "ablate")]},
        "cap": {"vectors": [vec(2, d["top2"], "cap", 0.0)]},
        "cap-below-zero": {"vectors": [vec(1, d["top1"], "cap", -2.0)]},
        "cap-gated-with-features": {
            "features": [{"layer": 1, "index": 3, "mode": "add", "value": 4.0}],
            "vectors": [vec(2, d["last2"], "cap", 0.2 * d["norm2"], when={"layer": 1, "index": d["a1"][0], "above": 0.5}),
                        vec(1, d["d3"], "add", 4.0)]},
        "cap-prompt-only": {"vectors": [vec(1, d["top1"], "cap", -4.0)], "apply_to": "prompt"},
        "add-generation-only": {"vectors": [vec(1, d["d3"], "add", 10.0)], "apply_to": "generation"},
    }


@pytest.mark.parametrize("name", list(cases({k: np.ones(1) for k in ("top1", "top2", "d3", "last2")}
                                            | {"a1": [0], "norm2": 1.0})))
def test_vector_steering_matches_the_reference(client, reference, directions, name):
    steering = cases(directions)[name]
    assert_server_matches_reference(client, reference, steering)
    assert server_greedy(client, steering)[1] != server_greedy(client, None)[1], "the case does not steer"


def test_vector_add_of_a_decoder_row_is_the_feature_add(client, directions):
    d3 = directions["d3"]  # the server's decoder row: the file's, rounded to bf16 like the server's copy
    _, feature_tokens, feature_logprobs = server_greedy(client, {"features": [
        {"layer": 1, "index": 3, "mode": "add", "value": 8.0}]})
    for steering in ({"vectors": [vec(1, 8.0 * d3, "add", 1.0)]}, {"vectors": [vec(1, d3, "add", 8.0)]}):
        _, tokens, logprobs = server_greedy(client, steering)
        assert tokens == feature_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, feature_logprobs)) < 1e-4
    assert feature_tokens != server_greedy(client, None)[1]


def test_vectors_are_echoed_by_digest(client, directions):
    steering = cases(directions)["cap-gated-with-features"]
    echo = server_greedy_echo(client, steering)
    by_mode = {e["mode"]: e for e in echo["vectors"]}
    assert set(by_mode) == {"add", "cap"} and echo["features"][0]["index"] == 3
    assert by_mode["add"] == {"layer": 1, "vector_id": by_mode["add"]["vector_id"], "mode": "add", "value": 4.0,
                              "norm": pytest.approx(float(directions["d3"].norm()), rel=1e-5)}
    assert by_mode["cap"]["when"] == {"layer": 1, "index": directions["a1"][0], "above": 0.5}
    assert 0 <= by_mode["cap"]["edited_tokens"] <= echo["steered_tokens"]
    again = server_greedy_echo(client, {**steering, "vectors": steering["vectors"][::-1]})
    assert again["id"] == echo["id"]  # order does not matter
    assert server_greedy_echo(client, cases(directions)["cap"])["id"] != echo["id"]


def server_greedy_echo(client, steering) -> dict:
    response = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=4, temperature=0,
                                              extra_body={"steering": steering})
    return response.model_extra["steering"]


def test_mixed_batch_of_feature_vector_and_unsteered_requests(server, client, directions):
    c = cases(directions)
    specs = [None, {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}, c["ablate"], c["cap"],
             c["cap-gated-with-features"], {"vectors": [vec(1, 8.0 * directions["d3"], "add", 1.0)]},
             c["add-generation-only"], c["cap-prompt-only"], None]
    alone = assert_batch_equals_solo(server, client, specs)
    assert alone[1] == alone[5]  # the vector add of 8 d_3 is the feature add of 8


def assert_batch_equals_solo(server, client, specs: list) -> list:
    """Each spec's greedy tokens run alone, then all at once in one batch: the same. Returns them."""
    work = lambda cl, s: server_greedy(cl, s)[1]
    alone = [work(client, s) for s in specs]
    together, steps = run_together(server, work, specs)
    assert together == alone
    assert len({tuple(t) for t in alone}) >= 4  # the batch really mixes different outputs
    assert steps <= 3 * 12, f"{steps} engine steps for {len(specs)} requests of 12 tokens: not one batch"
    return alone
