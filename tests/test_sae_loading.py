"""SAE loading: every supported on-disk format, orientation, conversion, and every error.

Files are tiny synthetic SAEs written in the exact published layouts (tests/sae_files.py);
no vLLM, no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steerserve_sae.sae.loading import (
    QwenScopeName,
    SAELoadError,
    describe_format,
    discover_sae_layers,
    load_sae_layer,
    parse_qwen_scope_name,
    qwen_scope_k,
    sae_name_of,
)
from tests.sae_files import (
    write_hub_cache,
    write_qwen_scope,
    write_saelens,
    write_saelens_one,
    write_sparsify,
)

D, N = 16, 64  # d_model, d_sae of the synthetic files
F32 = dict(d_model=D, dtype=torch.float32, device="cpu")


def load(sae_dir: Path, layer: int, **kw):
    return load_sae_layer(sae_dir, layer, **{**F32, **kw})


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- Qwen-Scope


def test_qwen_scope_values_and_orientation(tmp_path: Path) -> None:
    written = write_qwen_scope(tmp_path, layers=(0, 3), k=8)
    assert describe_format(tmp_path) == "qwen-scope"
    assert discover_sae_layers(tmp_path) == {
        0: tmp_path / "layer0.sae.pt",
        3: tmp_path / "layer3.sae.pt",
    }
    sae = load(tmp_path, 3)
    w = written[3]
    assert torch.equal(sae.W_enc, w["W_enc"])
    assert torch.equal(sae.W_dec, w["W_dec"].T)
    for i in (0, 17, N - 1):  # column i of the file is row i of SAEWeights
        assert torch.equal(sae.W_dec[i], w["W_dec"][:, i])
    assert sae.W_dec.is_contiguous() and sae.W_enc.is_contiguous()
    assert torch.equal(sae.b_enc, w["b_enc"]) and torch.equal(sae.b_dec, w["b_dec"])
    assert (sae.layer, sae.d_model, sae.d_sae) == (3, D, N)
    assert (sae.activation, sae.k, sae.threshold) == ("topk", 8, None)
    assert sae.apply_b_dec_to_input is False
    assert sae.architecture == "qwen-scope/topk"
    assert sae.hook_point == "resid_post"
    assert sae.source == str(tmp_path / "layer3.sae.pt")


def test_qwen_scope_legacy_torch_save_still_loads(tmp_path: Path) -> None:
    written = write_qwen_scope(tmp_path, layers=(1,))
    torch.save(written[1], tmp_path / "layer1.sae.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load(tmp_path, 1).W_dec, written[1]["W_dec"].T)


# --------------------------------------------------------------------------- Qwen-Scope as released


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SAE-Res-Qwen3.5-27B-W80K-L0_50", QwenScopeName("Qwen3.5-27B", 81920, 50)),
        ("SAE-Res-Qwen3.5-27B-W80K-L0_100", QwenScopeName("Qwen3.5-27B", 81920, 100)),
        ("Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_50", QwenScopeName("Qwen3.5-2B-Base", 32768, 50)),
        ("SAE-Res-Qwen3-30B-A3B-Base-W32K-L0_100", QwenScopeName("Qwen3-30B-A3B-Base", 32768, 100)),
        ("SAE-Res-Qwen3.5-27B-W80K-L0_50-copy", None),  # whole name only: no guessing
        ("SAE-Res-Qwen3.5-27B-W80K", None),
        ("SAE-Res-W80K-L0_50", None),  # no model part
        ("sae-res-qwen3.5-27b-w80k-l0_50", None),
        ("my-saes", None),
        ("sae", None),
    ],
)
def test_qwen_scope_name(name: str, expected: QwenScopeName | None) -> None:
    assert parse_qwen_scope_name(name) == expected


def test_sae_name_of_a_directory_and_of_a_hub_snapshot(tmp_path: Path) -> None:
    assert sae_name_of(tmp_path / "SAE-Res-Qwen3.5-27B-W80K-L0_50") == "SAE-Res-Qwen3.5-27B-W80K-L0_50"
    snapshot = tmp_path / "models--Qwen--SAE-Res-Qwen3.5-27B-W80K-L0_50" / "snapshots" / ("ab" * 20)
    assert sae_name_of(snapshot) == "SAE-Res-Qwen3.5-27B-W80K-L0_50"
    assert sae_name_of(tmp_path / "other" / "snapshots" / "x") == "x"  # not a hub cache


def test_as_released_k_and_width_from_the_directory_name(tmp_path: Path) -> None:
    root = tmp_path / "SAE-Res-Tiny-W1K-L0_32"
    written = write_qwen_scope(root, layers=(0, 5), d_sae=1024, k=999, with_config=False)
    assert not (root / "config.json").exists()
    assert describe_format(root) == "qwen-scope" and sorted(discover_sae_layers(root)) == [0, 5]
    assert qwen_scope_k(root) == 32
    sae = load(root, 5)
    assert (sae.k, sae.d_sae, sae.activation, sae.apply_b_dec_to_input) == (32, 1024, "topk", False)
    assert torch.equal(sae.W_dec, written[5]["W_dec"].T)


def test_as_released_in_a_hub_cache_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "files"
    write_qwen_scope(src, layers=(2,), d_sae=2048, with_config=False)
    snapshot = write_hub_cache(
        tmp_path / "hub", "Qwen/SAE-Res-Tiny-W2K-L0_50", {"layer2.sae.pt": src / "layer2.sae.pt"}
    )
    assert (load(snapshot, 2).k, load(snapshot, 2).d_sae) == (50, 2048)
    # The workers get the repo's name explicitly; it is what counts, not the path's.
    assert load(snapshot, 2, name="SAE-Res-Tiny-W2K-L0_100").k == 100


def test_sae_k_for_a_renamed_directory(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path / "my-saes", layers=(1,), with_config=False)
    assert qwen_scope_k(tmp_path / "my-saes", k=4) == 4
    assert load(tmp_path / "my-saes", 1, k=4).k == 4


def test_no_k_anywhere_names_the_three_ways(tmp_path: Path) -> None:
    root = tmp_path / "my-saes"
    write_qwen_scope(root, layers=(1,), with_config=False)
    expected = (
        f"{root}: no k for its Qwen-Scope SAEs (layer{{n}}.sae.pt files hold only tensors); give it "
        "one of three ways: name the directory or hub repo as released, "
        "SAE-Res-{model}-W{N}K-L0_{k} (this one is named 'my-saes'); put a config.json with "
        '{"model_type": "topk_sae", "k": K} beside the layer files; or pass --sae-k K'
    )
    for call in (lambda: qwen_scope_k(root), lambda: load(root, 1)):
        with pytest.raises(SAELoadError) as e:
            call()
        assert str(e.value) == expected


def test_conflicting_k_sources_name_both(tmp_path: Path) -> None:
    root = tmp_path / "SAE-Res-Tiny-W1K-L0_50"
    write_qwen_scope(root, layers=(1,), d_sae=1024, k=50)  # config.json agrees with the name
    assert qwen_scope_k(root) == 50 and qwen_scope_k(root, k=50) == 50
    with pytest.raises(SAELoadError) as e:
        qwen_scope_k(root, k=100)
    assert str(e.value) == (
        f"{root}: conflicting k for its Qwen-Scope SAEs: the name 'SAE-Res-Tiny-W1K-L0_50' says k=50; "
        f"{root / 'config.json'} says k=50; --sae-k says k=100; make them agree"
    )
    edit_json(root / "config.json", k=64)
    with pytest.raises(SAELoadError) as e:
        load(root, 1)
    assert str(e.value) == (
        f"{root}: conflicting k for its Qwen-Scope SAEs: the name 'SAE-Res-Tiny-W1K-L0_50' says k=50; "
        f"{root / 'config.json'} says k=64; make them agree"
    )
    # Not the directory's name but the hub repo's, when given.
    with pytest.raises(SAELoadError, match=r"the name 'SAE-Res-X-W1K-L0_8' says k=8; .* says k=64"):
        load(root, 1, name="SAE-Res-X-W1K-L0_8")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("SAE-Res-Tiny-W2K-L0_50", "weights have 1024 features but the name 'SAE-Res-Tiny-W2K-L0_50' says W2K (2048 features)"),
        ("SAE-Res-Tiny-W1K-L0_2000", "k=2000 (the name 'SAE-Res-Tiny-W1K-L0_2000') is larger than the SAE's 1024 features"),
    ],
)
def test_the_name_is_checked_against_the_weights(tmp_path: Path, name: str, problem: str) -> None:
    root = tmp_path / name
    write_qwen_scope(root, layers=(1,), d_sae=1024, with_config=False)
    with pytest.raises(SAELoadError) as e:
        load(root, 1)
    assert str(e.value) == f"{root / 'layer1.sae.pt'}: {problem}"


def test_config_json_without_k_leaves_k_to_the_name(tmp_path: Path) -> None:
    root = tmp_path / "SAE-Res-Tiny-W1K-L0_50"
    write_qwen_scope(root, layers=(1,), d_sae=1024)
    cfg = json.loads((root / "config.json").read_text())
    del cfg["k"]
    (root / "config.json").write_text(json.dumps(cfg))
    assert load(root, 1).k == 50


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_sae_k_is_refused_for_formats_with_their_own_k(tmp_path: Path, fmt: str) -> None:
    (write_saelens if fmt == "saelens" else write_sparsify)(tmp_path)
    assert qwen_scope_k(tmp_path) is None
    layer = min(discover_sae_layers(tmp_path))
    message = (
        f"{tmp_path} ({fmt}): --sae-k applies only to Qwen-Scope layer{{n}}.sae.pt files; "
        "this format's cfg.json gives each SAE's k"
    )
    for call in (lambda: qwen_scope_k(tmp_path, k=8), lambda: load(tmp_path, layer, k=8)):
        with pytest.raises(SAELoadError) as e:
            call()
        assert str(e.value) == message


# --------------------------------------------------------------------------- SAELens


def test_saelens_single_dir_jumprelu_v6_metadata(tmp_path: Path) -> None:
    w = write_saelens_one(tmp_path, 7, architecture="jumprelu", style="v6")
    assert describe_format(tmp_path) == "saelens"
    assert discover_sae_layers(tmp_path) == {7: tmp_path}
    sae = load(tmp_path, 7)
    assert torch.equal(sae.W_enc, w["W_enc"].T) and sae.W_enc.is_contiguous()
    assert torch.equal(sae.W_dec, w["W_dec"])
    assert torch.equal(sae.b_enc, w["b_enc"]) and torch.equal(sae.b_dec, w["b_dec"])
    assert sae.threshold is not None and torch.equal(sae.threshold, w["threshold"])
    assert (sae.activation, sae.k, sae.apply_b_dec_to_input) == ("jumprelu", None, False)
    assert sae.architecture == "saelens/jumprelu"
    assert sae.source == str(tmp_path / "sae_weights.safetensors")


def test_saelens_subdirs_legacy_standard(tmp_path: Path) -> None:
    written = write_saelens(tmp_path, layers=(2, 5), architecture="standard", style="legacy")
    assert describe_format(tmp_path) == "saelens"
    assert discover_sae_layers(tmp_path) == {
        2: tmp_path / "blocks.2.hook_resid_post",
        5: tmp_path / "blocks.5.hook_resid_post",
    }
    sae = load(tmp_path, 5)
    assert torch.equal(sae.W_enc, written[5]["W_enc"].T)
    assert torch.equal(sae.W_dec, written[5]["W_dec"])
    assert (sae.activation, sae.threshold, sae.apply_b_dec_to_input) == ("relu", None, True)
    assert sae.architecture == "saelens/standard"


@pytest.mark.parametrize("style", ["v6", "legacy"])  # k at top level / in activation_fn_kwargs
def test_saelens_topk(tmp_path: Path, style: str) -> None:
    write_saelens_one(tmp_path, 4, architecture="topk", k=12, style=style)
    sae = load(tmp_path, 4)
    assert (sae.activation, sae.k, sae.architecture) == ("topk", 12, "saelens/topk")


def test_saelens_layer_from_hook_layer_and_log_threshold(tmp_path: Path) -> None:
    sub = tmp_path / "whatever_name"
    w = write_saelens_one(sub, 9, style="legacy")
    edit_json(sub / "cfg.json", hook_name=None, hook_layer=9)  # layer only from hook_layer
    sd = load_file(str(sub / "sae_weights.safetensors"))
    sd["log_threshold"] = sd.pop("threshold").log()
    save_file(sd, str(sub / "sae_weights.safetensors"))
    assert discover_sae_layers(tmp_path) == {9: sub}
    sae = load(tmp_path, 9)
    assert sae.threshold is not None
    torch.testing.assert_close(sae.threshold, w["threshold"])


def test_saelens_apply_b_dec_to_input_defaults_like_saelens(tmp_path: Path) -> None:
    write_saelens_one(tmp_path, 1)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["apply_b_dec_to_input"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert load(tmp_path, 1).apply_b_dec_to_input is True  # SAELens' SAEConfig default


# --------------------------------------------------------------------------- sparsify


def test_sparsify_values_and_inferred_d_in(tmp_path: Path) -> None:
    written = write_sparsify(tmp_path, layers=(1, 4), k=6, with_d_in=False)
    assert describe_format(tmp_path) == "sparsify"
    assert discover_sae_layers(tmp_path) == {1: tmp_path / "layers.1", 4: tmp_path / "layers.4"}
    sae = load(tmp_path, 4)
    w = written[4]
    assert torch.equal(sae.W_enc, w["encoder.weight"])
    assert torch.equal(sae.b_enc, w["encoder.bias"])
    assert torch.equal(sae.W_dec, w["W_dec"]) and torch.equal(sae.b_dec, w["b_dec"])
    assert (sae.activation, sae.k, sae.threshold) == ("topk", 6, None)
    assert sae.apply_b_dec_to_input is True
    assert sae.architecture == "sparsify/topk"
    assert sae.source == str(tmp_path / "layers.4" / "sae.safetensors")


def test_sparsify_single_hookpoint_dir_and_prefixed_names(tmp_path: Path) -> None:
    write_sparsify(tmp_path, layers=(3, 11), hookpoint="model.language_model.layers.{layer}")
    assert set(discover_sae_layers(tmp_path)) == {3, 11}
    single = tmp_path / "model.language_model.layers.11"
    assert describe_format(single) == "sparsify"
    assert discover_sae_layers(single) == {11: single}
    assert load(single, 11).layer == 11


def test_sparsify_non_residual_hookpoints_are_skipped(tmp_path: Path) -> None:
    write_sparsify(tmp_path, layers=(2,))
    write_sparsify(tmp_path, layers=(2,), hookpoint="layers.{layer}.mlp")
    assert discover_sae_layers(tmp_path) == {2: tmp_path / "layers.2"}
    with pytest.raises(SAELoadError, match=r"layers\.2\.mlp"):
        load(tmp_path, 5)


# --------------------------------------------------------------------------- conversion


def _writers(seed: int = 0):
    """fmt -> writer of layer 2: (tensors written, encoder key, decoder key, decoder is columns)."""
    return {
        "qwen-scope": lambda p: (write_qwen_scope(p, (2,), seed=seed)[2], "W_enc", "W_dec", True),
        "saelens": lambda p: (write_saelens(p, (2,), seed=seed)[2], "W_enc", "W_dec", False),
        "sparsify": lambda p: (
            write_sparsify(p, (2,), seed=seed)[2],
            "encoder.weight",
            "W_dec",
            False,
        ),
    }


@pytest.mark.parametrize("fmt", ["qwen-scope", "saelens", "sparsify"])
def test_bfloat16_conversion(tmp_path: Path, fmt: str) -> None:
    w, enc_key, dec_key, dec_is_columns = _writers()[fmt](tmp_path)
    sae = load_sae_layer(tmp_path, 2, d_model=D, dtype=torch.bfloat16, device=torch.device("cpu"))
    tensors = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    if sae.threshold is not None:
        tensors.append(sae.threshold)
    for t in tensors:
        assert t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
    enc = w[enc_key] if fmt != "saelens" else w[enc_key].T
    dec = w[dec_key].T if dec_is_columns else w[dec_key]
    assert torch.equal(sae.W_enc, enc.to(torch.bfloat16))
    assert torch.equal(sae.W_dec, dec.to(torch.bfloat16))
    assert sae.info()["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- errors: layout


def test_unknown_format_lists_the_three_layouts(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    for call in (describe_format, discover_sae_layers, lambda p: load(p, 0)):
        with pytest.raises(SAELoadError) as e:
            call(tmp_path)
        msg = str(e.value)
        assert str(tmp_path) in msg and "not a recognised SAE directory" in msg
        for name in (
            "layer{n}.sae.pt",
            "sae_weights.safetensors",
            "sae.safetensors",
            "cfg.json",
            "layers.8",
        ):
            assert name in msg


def test_model_config_json_is_not_qwen_scope(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    with pytest.raises(SAELoadError, match="not a recognised SAE directory"):
        describe_format(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SAELoadError, match=r"nope: SAE directory does not exist"):
        discover_sae_layers(tmp_path / "nope")


def test_mixed_saelens_and_sparsify(tmp_path: Path) -> None:
    write_saelens(tmp_path, layers=(1,))
    write_sparsify(tmp_path, layers=(2,))
    with pytest.raises(SAELoadError, match=r"mix SAELens.*sparsify"):
        describe_format(tmp_path)


def test_missing_layer_qwen_scope(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(0, 3))
    with pytest.raises(SAELoadError) as e:
        load(tmp_path, 5)
    msg = str(e.value)
    assert f"looked for {tmp_path / 'layer5.sae.pt'}" in msg
    assert "layers present: 0, 3" in msg


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_missing_layer_subdir_formats(tmp_path: Path, fmt: str) -> None:
    (write_saelens if fmt == "saelens" else write_sparsify)(tmp_path, layers=(1, 4))
    with pytest.raises(SAELoadError) as e:
        load(tmp_path, 6)
    msg = str(e.value)
    assert "no SAE for layer 6" in msg and "layers present: 1, 4" in msg
    assert ("blocks.6.hook_resid_post" if fmt == "saelens" else str(tmp_path / "layers.6")) in msg


def test_duplicate_layer(tmp_path: Path) -> None:
    write_saelens_one(tmp_path / "a", 3)
    write_saelens_one(tmp_path / "b", 3)
    with pytest.raises(SAELoadError, match=r"two SAEs for layer 3: .*a and .*b"):
        discover_sae_layers(tmp_path)


# --------------------------------------------------------------------------- errors: Qwen-Scope


def test_qwen_scope_w_enc_wrong_hidden_size(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(8,), d_model=64, d_sae=512, config={"d_model": 128})
    with pytest.raises(SAELoadError) as e:
        load(tmp_path, 8, d_model=128)
    assert str(e.value) == (
        f"{tmp_path / 'layer8.sae.pt'}: W_enc has shape (512, 64) but the model's hidden "
        "size is 128; expected (d_sae, 128)"
    )


def test_qwen_scope_config_d_model_mismatch(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(0,))
    with pytest.raises(
        SAELoadError, match=r"config\.json: d_model is 16 but the model's hidden size is 32"
    ):
        load(tmp_path, 0, d_model=32)


def _rewrite_layer(path: Path, **changes) -> None:
    sd = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    torch.save(sd, path)


def test_qwen_scope_w_dec_stored_as_rows_is_rejected(tmp_path: Path) -> None:
    w = write_qwen_scope(tmp_path, layers=(1,))
    _rewrite_layer(tmp_path / "layer1.sae.pt", W_dec=w[1]["W_dec"].T.contiguous())
    with pytest.raises(SAELoadError) as e:
        load(tmp_path, 1)
    msg = str(e.value)
    assert msg.startswith(
        f"{tmp_path / 'layer1.sae.pt'}: W_dec has shape (64, 16); expected (16, 64)"
    )
    assert "(d_model, d_sae)" in msg and "from W_enc (64, 16)" in msg


def test_qwen_scope_bias_shapes(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(1,))
    _rewrite_layer(tmp_path / "layer1.sae.pt", b_dec=torch.zeros(15))
    with pytest.raises(
        SAELoadError, match=r"b_dec has shape \(15,\); expected \(16,\) \(d_model\)"
    ):
        load(tmp_path, 1)
    _rewrite_layer(tmp_path / "layer1.sae.pt", b_dec=torch.zeros(16), b_enc=torch.zeros(63))
    with pytest.raises(SAELoadError, match=r"b_enc has shape \(63,\); expected \(64,\) \(d_sae\)"):
        load(tmp_path, 1)


def test_qwen_scope_missing_tensor(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(1,))
    _rewrite_layer(tmp_path / "layer1.sae.pt", b_enc=None)
    with pytest.raises(
        SAELoadError,
        match=r"layer1\.sae\.pt: missing tensor\(s\) b_enc; expected W_enc, W_dec, b_enc, b_dec",
    ):
        load(tmp_path, 1)


def test_qwen_scope_config_d_sae_and_k(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(1,), config={"d_sae": 128})
    with pytest.raises(
        SAELoadError, match=r"weights have 64 features but .*config\.json says d_sae=128"
    ):
        load(tmp_path, 1)
    edit_json(tmp_path / "config.json", d_sae=64, k=100)
    with pytest.raises(
        SAELoadError,
        match=r"layer1\.sae\.pt: k=100 \(.*config\.json\) is larger than the SAE's 64 features",
    ):
        load(tmp_path, 1)
    edit_json(tmp_path / "config.json", k=None)
    with pytest.raises(SAELoadError, match=r"config\.json: k is None; expected a positive integer"):
        load(tmp_path, 1)


def test_qwen_scope_bad_config(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(1,), config={"hook_point": "resid_pre"})
    with pytest.raises(SAELoadError, match=r"config\.json: hook_point is 'resid_pre'"):
        load(tmp_path, 1)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SAELoadError, match=r"config\.json: not valid JSON"):
        load(tmp_path, 1)


def test_qwen_scope_corrupt_file(tmp_path: Path) -> None:
    write_qwen_scope(tmp_path, layers=(1,))
    (tmp_path / "layer1.sae.pt").write_bytes(b"garbage")
    with pytest.raises(SAELoadError, match=r"layer1\.sae\.pt: cannot load with torch\.load"):
        load(tmp_path, 1)
    torch.save([torch.zeros(1)], tmp_path / "layer1.sae.pt")
    with pytest.raises(
        SAELoadError, match=r"layer1\.sae\.pt: expected a dict of tensors, got list"
    ):
        load(tmp_path, 1)


# --------------------------------------------------------------------------- errors: SAELens


def test_saelens_gated_rejected(tmp_path: Path) -> None:
    write_saelens_one(tmp_path, 1, architecture="gated")
    with pytest.raises(SAELoadError, match=r"cfg\.json: architecture 'gated' is not supported"):
        load(tmp_path, 1)


@pytest.mark.parametrize("value", ["expected_average_only_in", "layer_norm", True])
def test_saelens_normalize_activations_rejected(tmp_path: Path, value) -> None:
    write_saelens_one(tmp_path, 1, cfg_updates={"normalize_activations": value})
    with pytest.raises(SAELoadError, match=rf"cfg\.json: normalize_activations is {value!r}"):
        load(tmp_path, 1)


def test_saelens_normalize_none_accepted(tmp_path: Path) -> None:
    write_saelens_one(tmp_path, 1, cfg_updates={"normalize_activations": None})
    assert load(tmp_path, 1).layer == 1


def test_saelens_w_enc_wrong_orientation(tmp_path: Path) -> None:
    w = write_saelens_one(tmp_path, 1)
    w["W_enc"] = w["W_enc"].T.contiguous()  # Qwen-Scope orientation in a SAELens file
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAELoadError) as e:
        load(tmp_path, 1)
    assert str(e.value) == (
        f"{tmp_path / 'sae_weights.safetensors'}: W_enc has shape (64, 16) but the model's "
        "hidden size is 16; expected (16, d_sae)"
    )


def test_saelens_d_in_mismatch(tmp_path: Path) -> None:
    write_saelens_one(tmp_path, 1)
    with pytest.raises(
        SAELoadError, match=r"cfg\.json: d_in is 16 but the model's hidden size is 32"
    ):
        load(tmp_path, 1, d_model=32)


def test_saelens_missing_threshold_and_bad_threshold(tmp_path: Path) -> None:
    w = write_saelens_one(tmp_path, 1, architecture="jumprelu")
    thr = w.pop("threshold")
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(
        SAELoadError, match=r"sae_weights\.safetensors: missing tensor\(s\) threshold"
    ):
        load(tmp_path, 1)
    w["threshold"] = thr[:10].contiguous()
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(
        SAELoadError, match=r"threshold has shape \(10,\); expected \(64,\) \(d_sae\)"
    ):
        load(tmp_path, 1)


def test_saelens_topk_without_k_and_unknown_arch(tmp_path: Path) -> None:
    write_saelens_one(tmp_path, 1, architecture="topk", k=None)
    with pytest.raises(SAELoadError, match=r"cfg\.json: topk SAE without k"):
        load(tmp_path, 1)
    edit_json(tmp_path / "cfg.json", architecture="matryoshka_batchtopk")
    with pytest.raises(SAELoadError, match=r"architecture 'matryoshka_batchtopk' is not supported"):
        load(tmp_path, 1)


def test_saelens_non_resid_post_hook(tmp_path: Path) -> None:
    write_saelens_one(tmp_path, 1)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_pre"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(
        SAELoadError, match=r"cfg\.json: hook 'blocks\.1\.hook_resid_pre' is not resid_post"
    ):
        discover_sae_layers(tmp_path)


# --------------------------------------------------------------------------- errors: sparsify


def test_sparsify_skip_connection_rejected(tmp_path: Path) -> None:
    write_sparsify(tmp_path, layers=(2,), cfg_updates={"skip_connection": True})
    with pytest.raises(
        SAELoadError, match=r"layers\.2/cfg\.json: skip_connection=true is not supported"
    ):
        load(tmp_path, 2)
    edit_json(tmp_path / "layers.2" / "cfg.json", skip_connection=False)  # W_skip still in file
    with pytest.raises(SAELoadError, match=r"sae\.safetensors: has W_skip"):
        load(tmp_path, 2)


def test_sparsify_shape_and_key_errors(tmp_path: Path) -> None:
    w = write_sparsify(tmp_path, layers=(2,))[2]
    path = tmp_path / "layers.2" / "sae.safetensors"
    with pytest.raises(
        SAELoadError, match=r"cfg\.json: d_in is 16 but the model's hidden size is 8"
    ):
        load(tmp_path, 2, d_model=8)
    edit_json(tmp_path / "layers.2" / "cfg.json", d_in=None)
    with pytest.raises(SAELoadError) as e:
        load(tmp_path, 2, d_model=8)
    assert str(e.value) == (
        f"{path}: encoder.weight has shape (64, 16) but the model's hidden size is 8; "
        "expected (d_sae, 8)"
    )
    save_file({**w, "W_dec": w["W_dec"][:32].contiguous()}, str(path))
    with pytest.raises(SAELoadError, match=r"W_dec has shape \(32, 16\); expected \(64, 16\)"):
        load(tmp_path, 2)
    save_file({k: v for k, v in w.items() if k != "encoder.bias"}, str(path))
    with pytest.raises(SAELoadError, match=r"missing tensor\(s\) encoder\.bias"):
        load(tmp_path, 2)
    save_file(w, str(path))
    edit_json(tmp_path / "layers.2" / "cfg.json", num_latents=128)
    with pytest.raises(
        SAELoadError, match=r"weights have 64 features but .*cfg\.json says num_latents=128"
    ):
        load(tmp_path, 2)
    edit_json(tmp_path / "layers.2" / "cfg.json", num_latents=0)  # 0 = from expansion_factor
    assert load(tmp_path, 2).d_sae == N


def test_sparsify_corrupt_safetensors(tmp_path: Path) -> None:
    write_sparsify(tmp_path, layers=(2,))
    (tmp_path / "layers.2" / "sae.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SAELoadError, match=r"sae\.safetensors: cannot read as safetensors"):
        load(tmp_path, 2)


@pytest.mark.parametrize("fmt", ["qwen-scope", "saelens", "sparsify"])
def test_loaded_weights_do_not_alias_the_file(tmp_path: Path, fmt: str) -> None:
    """fp32 on CPU must still be a copy: the loaders read through memory maps."""
    _writers()[fmt](tmp_path)
    sae = load(tmp_path, 2)
    before = [t.clone() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    file = Path(sae.source)
    # Same-size rewrite in place (no truncation, which would SIGBUS an aliased map).
    _writers(seed=1)[fmt](tmp_path / "other")
    other_file = tmp_path / "other" / file.relative_to(tmp_path)
    new_bytes = other_file.read_bytes()
    assert len(new_bytes) == file.stat().st_size
    with open(file, "r+b") as f:
        f.write(new_bytes)
    after = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not torch.equal(load(tmp_path, 2).W_dec, sae.W_dec)  # the file did change


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fmt", ["qwen-scope", "saelens", "sparsify"])
def test_cuda_bfloat16(tmp_path: Path, fmt: str) -> None:
    w, _, dec_key, dec_is_columns = _writers()[fmt](tmp_path)
    sae = load_sae_layer(tmp_path, 2, d_model=D, dtype=torch.bfloat16, device="cuda")
    assert sae.W_dec.is_cuda and sae.W_dec.is_contiguous() and sae.W_dec.dtype == torch.bfloat16
    dec = w[dec_key].T if dec_is_columns else w[dec_key]
    assert torch.equal(sae.W_dec.cpu(), dec.to(torch.bfloat16))
