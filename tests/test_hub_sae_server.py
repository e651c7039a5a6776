"""`--sae <hub id>` end to end: a server started from an offline Hugging Face cache that holds
a Qwen-Scope repo as released (layer files, no config.json; k and width from the repo name).

One engine start. The cache holds what a download of the steered layers leaves behind (see
tests/sae_files.write_hub_cache): the tiny model's layer files for layers 1 and 2 plus README.md,
under a repo named for their width (W1K = 1024 features) and a k of 8 (the tiny model's own
config.json says 16: seeing 8 proves the name is what was read).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import API_KEY, AUTH, MODEL_NAME, PROMPT, SAE_LAYERS, openai_client, serve_args, serving
from tests.sae_files import write_hub_cache

REPO = "Qwen/SAE-Res-tiny-qwen3.5-W1K-L0_8"
MAX_TOKENS = 8
RELEASE = [f"layer{n}.sae.pt" for n in range(4)] + ["README.md", "LICENSE", "app.py", ".gitattributes"]


@pytest.fixture(scope="module")
def hub_server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub-sae")
    (tmp / "README.md").write_text("# SAE-Res-tiny-qwen3.5-W1K-L0_8\n")
    files = {f"layer{n}.sae.pt": tiny_model_dir / "sae" / f"layer{n}.sae.pt" for n in SAE_LAYERS}
    snapshot = write_hub_cache(tmp / "hub", REPO, {**files, "README.md": tmp / "README.md"}, listed=RELEASE)
    assert not (snapshot / "config.json").exists()
    args = serve_args(tiny_model_dir, "--api-key", API_KEY)
    args[args.index("--sae") + 1] = REPO
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "hub")}
    with serving(args, tmp / "server.log", env) as running:
        yield running, snapshot.name


def test_saes_report_the_repo_and_commit(hub_server):
    server, commit = hub_server
    data = httpx.get(f"{server.base_url}/v1/saes", headers=AUTH).json()["data"]
    assert [(d["layer"], d["d_sae"], d["k"], d["architecture"], d["source"]) for d in data] == [
        (n, 1024, 8, "qwen-scope/topk", f"hf://{REPO}@{commit}/layer{n}.sae.pt") for n in SAE_LAYERS
    ]


def test_steering_from_the_hub_sae_changes_output_as_the_circuit_predicts(hub_server, tiny_model_dir):
    """Adding layer 1's copy-code feature for token u makes the tiny model emit successor[u] at
    every step (tiny_model_info.json); unsteered it does not."""
    server, _ = hub_server
    info = json.loads((tiny_model_dir / "tiny_model_info.json").read_text())
    first_code = info["sae_feature_kinds"]["code"][0]
    u = info["sae_features"][1]["code_features"][0]
    expected = [info["successor"][u]] * MAX_TOKENS
    client = openai_client(server)

    def chat(steering=None):
        extra = {"return_token_ids": True} | ({"steering": steering} if steering else {})
        return client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, temperature=0,
                                              max_tokens=MAX_TOKENS, extra_body=extra)

    feature = {"layer": 1, "index": first_code, "mode": "add", "value": 8.0}
    steered = chat({"features": [feature]})
    plain = chat()
    assert steered.model_extra["steering"]["features"] == [feature]
    assert list(steered.choices[0].model_extra["token_ids"]) == expected
    assert list(plain.choices[0].model_extra["token_ids"]) != expected
    assert "steering" not in plain.model_extra
