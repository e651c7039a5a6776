"""Qwen-Scope's other models, served: stand-ins of a dense Qwen3 (Qwen3-8B-Base), a Qwen3 MoE
(Qwen3-30B-A3B-Base) and a Qwen3.5 MoE (the post-trained Qwen3.5-35B-A3B with the SAEs of its
Base model, as users will run it) with an SAE repo of each named like its release, from an
offline hub cache by hub id, through the model's own config file (configs/<model>.yaml: hub ids,
language-model-only for the Qwen3.5 wrapper, the chat model's parsers) with CPU overrides (one
rank, a small memory reservation, SAEs on stand-in layers 1 and 3 of 4). The Qwen3.5 MoE is
served compiled (torch.compile, the steering op inside the traced MoE model, where a Python-level
patch would silently stop steering); the two Qwen3 stand-ins eager, to keep the module's engine
starts within its CI share (compiled dense Qwen3 and Qwen3.5 run in other modules).

Every steered answer (clamp, add, ablate, gates) and a trace equal the independent Hugging Face
reference (tests/hf_reference.py, which runs transformers' own Qwen3 / Qwen3-MoE / Qwen3.5-MoE
classes and reads the release's files itself). The stand-ins (tests/qwen_scope_standins.py)
keep the 27B stand-in's circuit: the greedy answer is a script, the SAE features are token
directions, a "city" axis that makes the model write Berlin for Paris, and free axes; the MoE
experts and shared expert are random and write only into scratch dims, so routing differences
between bf16 kernels cannot flip a token. One engine per stand-in, one at a time.

What the checks need from the MoE hook point: the layer's output (hidden_states, residual) is
the residual stream after the layer as for the dense layers (the trace reads f from it, the
clamps edit it, and layer 3 sees layer 1's edits).
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from tests.conftest import ROOT, serving
from tests.hf_reference import load_reference
from tests.qwen35_27b_standin import build_standins
from tests.qwen_scope_standins import QWEN_SCOPE_MODELS, target

LAYERS = (1, 3)
# served model -> the model its SAEs were trained on
STANDINS = {"Qwen/Qwen3-8B-Base": "Qwen/Qwen3-8B-Base", "Qwen/Qwen3-30B-A3B-Base": "Qwen/Qwen3-30B-A3B-Base",
            "Qwen/Qwen3.5-35B-A3B": "Qwen/Qwen3.5-35B-A3B-Base"}
COMPILED = {"Qwen/Qwen3.5-35B-A3B"}
K = 50  # every served SAE repo here is L0_50
MAX_TOKENS = 40


def _snapshot(cache, repo: str):
    folder = cache / f"models--{repo.replace('/', '--')}"
    return folder / "snapshots" / (folder / "refs" / "main").read_text()


@pytest.fixture(scope="module", params=sorted(STANDINS))
def served(request, tmp_path_factory):
    model = QWEN_SCOPE_MODELS[STANDINS[request.param]]
    if request.param != model.repo:  # the post-trained model of the same shape
        model = dataclasses.replace(model, repo=request.param, config=request.param.split("/")[1].lower() + ".yaml")
    work = tmp_path_factory.mktemp(model.repo.split("/")[1])
    standin = build_standins(work / "hub", num_layers=4, target=target(model, model.sae_repos[0], LAYERS))
    reference = load_reference(_snapshot(work / "hub", model.repo), _snapshot(work / "hub", model.sae_repos[0]),
                               sae_k=K)
    args = ["--config", str(ROOT / "configs" / model.config), "--sae-layers", ",".join(map(str, LAYERS)),
            "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.05", "--max-model-len", "1024",
            "--data-dir", str(work / "data"), *(() if request.param in COMPILED else ("--enforce-eager",))]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hub")}
    with serving(args, work / "server.log", env) as running:
        with httpx.Client(base_url=running.base_url, timeout=300) as http:
            name = http.get("/v1/models").json()["data"][0]["id"]
            yield model, standin, reference, http, name, work / "server.log"


def _prompt(reference) -> list[int]:
    return reference.chat_prompt_ids([{"role": "user", "content": "Weather in Paris?"}])


def _complete(http, name: str, prompt: list[int], **extra) -> dict:
    body = {"model": name, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "return_token_ids": True,
            **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _expected(reference, prompt: list[int], steering: list[dict] | None = None) -> list[int]:
    im_end = reference.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, _ = reference.greedy_generate(prompt, MAX_TOKENS, steering=steering, stop_token_ids=[im_end])
    return tokens


def test_served_by_hub_id_with_the_release_named_sae(served):
    """/v1/saes names the repo, its commit and the model the SAEs were trained on; start-up says
    in one line when that is not the served model (the Base SAEs on Qwen3.5-35B-A3B)."""
    model, standin, _, http, name, log = served
    assert name == model.config.removesuffix(".yaml")
    saes = http.get("/v1/saes").json()["data"]
    commit = (standin.cache / f"models--{model.sae_repos[0].replace('/', '--')}" / "refs" / "main").read_text()
    width = int(model.sae_repos[0].rsplit("-W", 1)[1].split("K")[0]) * 1024
    assert [(s["layer"], s["d_sae"], s["k"], s["source"], s["model"]) for s in saes] == [
        (n, width, K, f"hf://{model.sae_repos[0]}@{commit}/layer{n}.sae.pt", STANDINS[model.repo]) for n in LAYERS]
    said = [line for line in log.read_text().splitlines() if "were trained on" in line]
    if STANDINS[model.repo] == model.repo:
        assert said == []
    else:
        assert said == [f"steerserve: the SAEs {model.sae_repos[0]} were trained on {STANDINS[model.repo]}, not on "
                        f"the served model {model.repo}: measure how well they fit it with `steerserve eval` "
                        "(FVU, KL) before trusting features"]


def spec_cases(standin) -> dict[str, list[dict]]:
    """Each a steering spec the circuit answers with a clear greedy choice at every step."""
    at1, at3 = standin.features[1], standin.features[3]
    script_token = standin.script_ids[3]
    return {
        "unsteered": [],
        # a free axis clamped on the reasoning tokens only, the city where it is due: Berlin
        "gated clamps": [
            {"layer": 1, "index": at1.free[0], "mode": "clamp", "value": 24.0,
             "when": {"layer": 1, "index": at1.reasoning, "above": 2.0}},
            {"layer": 3, "index": at3.city, "mode": "clamp", "value": 12.0,
             "when": {"layer": 3, "index": at3.token[standin.city_cue], "above": 3.0}},
        ],
        # the city axis everywhere from layer 1 on: Berlin wins at every step
        "add": [{"layer": 1, "index": at1.city, "mode": "add", "value": 12.0}],
        # a script token's own feature removed at layer 1: where it is read, nothing says what follows
        "ablate": [{"layer": 1, "index": at1.token[script_token], "mode": "ablate"}],
    }


def test_steered_tokens_equal_the_reference(served):
    _, standin, reference, http, name, _ = served
    prompt = _prompt(reference)
    answers = {}
    for case, features in spec_cases(standin).items():
        extra = {"steering": {"features": features}} if features else {}
        got = _complete(http, name, prompt, **extra)["choices"][0]["token_ids"]
        assert got == _expected(reference, prompt, features), case
        answers[case] = tuple(got)
    # the cases are different answers (each edit changed what the model wrote)
    assert len(set(answers.values())) == len(answers), answers
    assert standin.berlin in answers["gated clamps"] and standin.berlin not in answers["unsteered"]


def test_trace_equals_the_reference_features(served):
    """The trace of the gated clamps at both layers: per generated token, the features above 1
    equal the reference's encoding of its own steered residual stream (layer 1's clamp shows at
    layer 1; layer 3 reads the stream after the MoE layers in between)."""
    _, standin, reference, http, name, _ = served
    prompt = _prompt(reference)
    features = spec_cases(standin)["gated clamps"]
    answer = _complete(http, name, prompt, steering={"features": features},
                       trace={"layers": list(LAYERS), "top_k": 4})["choices"][0]
    tokens = answer["token_ids"]
    sequence = prompt + tokens
    _, residuals = reference.forward(sequence[:-1], features, capture=True)
    trace = answer["trace"]
    assert [e["position"] for e in trace] == list(range(len(prompt) - 1, len(sequence) - 1))
    for entry in trace:
        for layer in LAYERS:
            f = reference.encode(layer, residuals[layer][entry["position"]])
            expected = {int(i): float(f[i]) for i in (f > 1.0).nonzero().flatten()}
            fired = {x["index"]: x["activation"] for x in entry["features"][str(layer)] if x["activation"] > 1.0}
            assert fired == pytest.approx(expected, rel=0.02), (entry["position"], layer)
    assert any(x["index"] == standin.features[3].city for e in trace for x in e["features"]["3"])
