"""Every Qwen-Scope release without an engine: the 14 repo names read into k and width, each
model's architecture known to the steering table, and each model's config file parsed by
`steerserve serve`'s own parser (vLLM's, reading --config) and checked against the model.

The names, models and layer counts are sae-lens 6.54's `pretrained_saes.yaml` (releases
`qwen-scope-*`), written out here; d_model per model is sae-lens' own `QWEN_SCOPE_MODEL_INFO`.
"""

from __future__ import annotations

import pytest

from steerserve_sae.sae.formats.qwen_scope import QwenScopeName, parse_qwen_scope_name
from steerserve_sae.vllm_hooks.architectures import ARCHITECTURES
from tests.conftest import ROOT
from tests.qwen_scope_standins import QWEN_SCOPE_MODELS

# repo -> (model part of the name, features, k), as the release defines them (W{N}K: N x 1024)
RELEASES = {
    "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50": ("Qwen3-1.7B-Base", 32768, 50),
    "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_100": ("Qwen3-1.7B-Base", 32768, 100),
    "Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50": ("Qwen3-8B-Base", 65536, 50),
    "Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_100": ("Qwen3-8B-Base", 65536, 100),
    "Qwen/SAE-Res-Qwen3-30B-A3B-Base-W32K-L0_50": ("Qwen3-30B-A3B-Base", 32768, 50),
    "Qwen/SAE-Res-Qwen3-30B-A3B-Base-W128K-L0_100": ("Qwen3-30B-A3B-Base", 131072, 100),
    "Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_50": ("Qwen3.5-2B-Base", 32768, 50),
    "Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100": ("Qwen3.5-2B-Base", 32768, 100),
    "Qwen/SAE-Res-Qwen3.5-9B-Base-W64K-L0_50": ("Qwen3.5-9B-Base", 65536, 50),
    "Qwen/SAE-Res-Qwen3.5-9B-Base-W64K-L0_100": ("Qwen3.5-9B-Base", 65536, 100),
    "Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50": ("Qwen3.5-27B", 81920, 50),
    "Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_100": ("Qwen3.5-27B", 81920, 100),
    "Qwen/SAE-Res-Qwen3.5-35B-A3B-Base-W32K-L0_50": ("Qwen3.5-35B-A3B-Base", 32768, 50),
    "Qwen/SAE-Res-Qwen3.5-35B-A3B-Base-W128K-L0_100": ("Qwen3.5-35B-A3B-Base", 131072, 100),
}
LAYER_COUNTS = {"Qwen/Qwen3-1.7B-Base": 28, "Qwen/Qwen3-8B-Base": 36, "Qwen/Qwen3-30B-A3B-Base": 48,
                "Qwen/Qwen3.5-2B-Base": 24, "Qwen/Qwen3.5-9B-Base": 32, "Qwen/Qwen3.5-27B": 64,
                "Qwen/Qwen3.5-35B-A3B-Base": 40}
CHAT_CONFIGS = {"qwen3.5-27b.yaml": "Qwen/Qwen3.5-27B", "qwen3.5-35b-a3b.yaml": "Qwen/Qwen3.5-35B-A3B"}


@pytest.mark.parametrize("repo", sorted(RELEASES))
def test_every_release_name_gives_its_k_and_width(repo):
    model, d_sae, k = RELEASES[repo]
    assert parse_qwen_scope_name(repo) == QwenScopeName(model, d_sae, k)
    assert parse_qwen_scope_name(repo.split("/")[1]) == QwenScopeName(model, d_sae, k)


def test_the_table_lists_the_fourteen_releases_on_seven_models():
    assert sorted(r for m in QWEN_SCOPE_MODELS.values() for r in m.sae_repos) == sorted(RELEASES)
    assert {m.repo: m.num_layers for m in QWEN_SCOPE_MODELS.values()} == LAYER_COUNTS


def test_sae_lens_agrees_on_models_and_widths():
    """sae-lens' own table of the models Qwen-Scope was trained on: the d_model each takes."""
    from sae_lens.loading.pretrained_sae_loaders import QWEN_SCOPE_MODEL_INFO

    for model in QWEN_SCOPE_MODELS.values():
        assert QWEN_SCOPE_MODEL_INFO[model.repo.split("/")[1]] == (model.repo, model.hidden_size)


@pytest.mark.parametrize("model", sorted(QWEN_SCOPE_MODELS))
def test_every_architecture_is_steerable(model):
    """The architecture entry finds the layer count and width in the model's config.json shape
    (wrappers nest them under text_config)."""
    info = QWEN_SCOPE_MODELS[model]
    arch = ARCHITECTURES[info.architecture]
    text = {"hidden_size": info.hidden_size, "num_hidden_layers": info.num_layers}
    config = {"architectures": [info.architecture], **({"text_config": text} if arch.text_config else text)}
    assert (arch.hidden_size(config), arch.num_layers(config)) == (info.hidden_size, info.num_layers)


@pytest.fixture(scope="module")
def parse():
    """steerserve serve's own parser: vLLM's FlexibleArgumentParser reads --config; no engine."""
    from steerserve.cli.serve import build_parser

    parser = build_parser()
    return lambda *argv: parser.parse_args(["serve", *argv])


CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("qwen*.yaml"))


def test_a_config_per_model():
    assert {m.config for m in QWEN_SCOPE_MODELS.values()} | set(CHAT_CONFIGS) == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_parses_and_fits_its_model(parse, name):
    args = parse("--config", str(ROOT / "configs" / name))
    served = CHAT_CONFIGS.get(name) or next(m.repo for m in QWEN_SCOPE_MODELS.values() if m.config == name)
    trained_on = next(m for m in QWEN_SCOPE_MODELS.values() if args.sae in m.sae_repos)
    assert args.model == served and args.served_model_name == [name.removesuffix(".yaml")]
    assert served.removesuffix("-Base") == trained_on.repo.removesuffix("-Base")  # its own SAEs, Base or not
    layers = [int(n) for n in args.sae_layers]
    assert len(layers) == 3 and all(0 < n < trained_on.num_layers for n in layers)
    assert layers == [trained_on.num_layers * q // 4 for q in (1, 2, 3)]  # spread over the depth
    assert args.dtype == "bfloat16" and args.tensor_parallel_size >= 1 and args.enable_prefix_caching
    wrapper = ARCHITECTURES[trained_on.architecture].text_config is not None
    assert bool(args.language_model_only) == wrapper
    chat = name in CHAT_CONFIGS
    assert (args.reasoning_parser, args.tool_call_parser, bool(args.enable_auto_tool_choice)) == (
        ("qwen3", "qwen3_coder", True) if chat else ("", None, False))


@pytest.mark.parametrize(("name", "repo_id", "model"), [
    ("SAE-Res-Qwen3.5-9B-Base-W64K-L0_50", "Qwen/SAE-Res-Qwen3.5-9B-Base-W64K-L0_50", "Qwen/Qwen3.5-9B-Base"),
    ("SAE-Res-Qwen3-30B-A3B-Base-W128K-L0_100", None, "Qwen3-30B-A3B-Base"),  # a local directory
    ("my-saes", None, None),
])
def test_the_model_an_sae_set_was_trained_on(name, repo_id, model):
    from steerserve_sae.sae.formats.qwen_scope import trained_on

    assert trained_on(name, repo_id) == model


@pytest.mark.parametrize(("served", "said"), [
    ("Qwen/Qwen3.5-9B", True),  # the post-trained model with its Base model's SAEs
    ("Qwen/Qwen3.5-9B-Base", False),
    ("qwen/qwen3.5-9b-base", False),
    ("{tmp}/models--Qwen--Qwen3.5-9B-Base/snapshots/" + "ab" * 20, False),  # a snapshot in the hub cache
    ("{tmp}/Qwen3.5-9B", True),  # a local copy of the post-trained model
])
def test_start_up_says_when_the_saes_were_trained_on_another_model(tmp_path, capsys, served, said):
    from steerserve.cli.serve import say_what_the_saes_were_trained_on
    from steerserve.sae_source import SAESource

    served = served.format(tmp=tmp_path)
    if served.startswith(str(tmp_path)):
        (tmp_path / served).mkdir(parents=True)
    repo = "Qwen/SAE-Res-Qwen3.5-9B-Base-W64K-L0_50"
    say_what_the_saes_were_trained_on(served, SAESource("/cache/snapshot", repo.split("/")[1], repo, "c0ffee"))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ([f"steerserve: the SAEs {repo} were trained on Qwen/Qwen3.5-9B-Base, not on the served model "
                      f"{served}: measure how well they fit it with `steerserve eval` (FVU, KL) before trusting "
                      "features"] if said else [])


def test_a_layer_holding_only_its_share_of_the_tokens_is_refused():
    """vLLM's Qwen3.5 MoE layers flag sequence-parallel MoE (expert parallel, TP > 1) with
    use_attn_reduce_scatter_for_moe; steering needs every token's stream on every rank."""
    from torch import nn

    from steerserve_sae.vllm_hooks.architectures import UnsupportedArchitecture, check_steerable_layer

    layer = nn.Module()
    layer.use_attn_reduce_scatter_for_moe = False
    check_steerable_layer(layer, 10)
    layer.use_attn_reduce_scatter_for_moe = True
    with pytest.raises(UnsupportedArchitecture, match="decoder layer 10 .* sequence-parallel MoE"):
        check_steerable_layer(layer, 10)


@pytest.mark.parametrize("model", sorted(QWEN_SCOPE_MODELS))
def test_every_model_has_a_stand_in_of_its_shape(model, tmp_path):
    """The stand-in's config.json has the model's architecture and structure (experts, top-k,
    shared expert; Qwen3.5's layer pattern and vision config) at tiny widths, and the SAE repo
    is named and listed like the release (one file per real layer, only the steered ones fetched)."""
    import json

    from tests.qwen35_27b_standin import build_standins
    from tests.qwen_scope_standins import STANDIN_EXPERTS, target

    info = QWEN_SCOPE_MODELS[model]
    sae_repo = min(info.sae_repos, key=len)  # the narrower L0_50 set
    build_standins(tmp_path, num_layers=4, target=target(info, sae_repo, (2,)))
    folder = tmp_path / f"models--{model.replace('/', '--')}"
    config = json.loads((folder / "snapshots" / (folder / "refs" / "main").read_text() / "config.json").read_text())
    assert config["architectures"] == [info.architecture]
    text = config.get("text_config", config)
    assert ("vision_config" in config) == ("text_config" in config) == info.architecture.endswith("Generation")
    assert text["num_hidden_layers"] == 4 and text["hidden_size"] == 128
    if "text_config" in config:
        assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
        assert config["vision_config"]["out_hidden_size"] == 128
    moe = {"num_experts": STANDIN_EXPERTS, "num_experts_per_tok": info.experts_per_token} if info.moe else {}
    assert {key: text.get(key) for key in moe} == moe
    assert ("shared_expert_intermediate_size" in text) == info.shared_expert
    sae = tmp_path / f"models--{sae_repo.replace('/', '--')}"
    commit = (sae / "refs" / "main").read_text()
    assert sorted(p.name for p in (sae / "snapshots" / commit).iterdir()) == ["LICENSE", "README.md", "app.py",
                                                                               "layer2.sae.pt"]
    listed = json.loads((sae / "trees" / f"{commit}.json").read_text())["files"]
    assert sum(name.startswith("layer") for name in listed) == info.num_layers
