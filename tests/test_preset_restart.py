"""Steering presets across restarts, on servers of this module's own (eager, to start quickly):
`--steering-presets FILE` seeds them, those created over HTTP survive a restart on the same
--data-dir, --max-presets bounds them, and every stored preset is checked again at start-up: one
that no longer fits the loaded SAEs, or whose name a served model took, is logged and refused
(not in /v1/models, a 400 `preset_unusable` for a request naming it, its status in the list). A
preset of the file that does not fit the loaded SAEs stops the start-up with an error naming the
file and the preset (one that is not even a mapping stops it before vLLM)."""

from __future__ import annotations

import httpx
import pytest

from steerserve.serve_process import ServerStartError
from tests.conftest import API_KEY, AUTH, PROMPT, engine_steps, serve_args, serving, start_server
from tests.test_cli_startup import serve

STEER = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}
DEEP = {"features": [{"layer": 2, "index": 3, "mode": "add", "value": 8.0}]}  # no longer fits after the restart
NOT_AT_2 = "layer_not_loaded: steering.features[0].layer: no SAE is loaded at layer 2; loaded layers: [1]"


def statuses(base_url: str) -> dict[str, tuple[str, str, str | None]]:
    presets = httpx.get(f"{base_url}/v1/steering/presets", headers=AUTH).json()["data"]
    return {p["name"]: (p["source"], p["status"], p["refused_because"]) for p in presets}


def create(base_url: str, name: str, steering: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/steering/presets", headers=AUTH, json={"name": name, "steering": steering})


def contrast(base_url: str, save_as: str, layers: list[int] | None) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/features/contrast", headers=AUTH, timeout=300, json={
        "positive": ["rain"], "negative": ["bread"], "save_as": save_as, "layers": layers})


def test_presets_are_seeded_survive_a_restart_are_rechecked_and_a_bad_file_stops_the_start(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    good = tmp_path / "presets.yaml"
    good.write_text("from-file:\n  description: seeded\n  steering:\n    features:\n"
                    "      - {layer: 1, index: 3, mode: add, value: 8}\n")
    args = serve_args(tiny_model_dir, "--enforce-eager", "--api-key", API_KEY, "--data-dir", str(data))
    first_args = [*args, "--steering-presets", str(good), "--max-presets", "3", "--max-steering-vectors", "1"]
    with serving(first_args, tmp_path / "first.log") as first:
        assert statuses(first.base_url) == {"from-file": (str(good), "served", None)}
        assert create(first.base_url, "from-api", STEER).status_code == 200
        steps = engine_steps(first)
        two_layers = contrast(first.base_url, "caa", None)
        assert two_layers.status_code == 400 and two_layers.json()["error"] == {
            "message": "save_as stores a preset with a vector at each of 2 layers; this server steers with at most 1 "
                       "(--max-steering-vectors): name fewer `layers`",
            "type": "invalid_request_error", "param": "save_as", "code": "too_many_vectors"}
        assert create(first.base_url, "deep", DEEP).status_code == 200
        full = create(first.base_url, "fourth", STEER)
        too_many = {"message": "this server stores at most 3 steering presets (--max-presets); delete one first",
                    "type": "invalid_request_error", "param": "name", "code": "too_many_presets"}
        assert full.status_code == 400 and full.json()["error"] == too_many
        assert create(first.base_url, "deep", STEER).json()["error"]["code"] == "preset_exists"  # 409 before full
        full_save = contrast(first.base_url, "caa", [1])
        assert full_save.status_code == 400 and full_save.json()["error"] == {**too_many, "param": "save_as"}
        assert engine_steps(first) == steps  # both save_as refused before any example ran
        chat = httpx.post(f"{first.base_url}/v1/chat/completions", headers=AUTH, timeout=300, json={
            "model": "from-file", "messages": PROMPT, "max_tokens": 2, "temperature": 0}).json()
        assert (chat["model"], chat["steering"]["preset"]) == ("from-file", "from-file")
    # Restarted with the SAE at layer 1 only, and "from-api" also a name of the served model.
    second_args = [*args, "--sae-layers", "1", "--served-model-name", "tiny", "from-api"]
    with serving(second_args, tmp_path / "second.log") as second:
        taken = "model_name_taken: 'from-api' is the name of a served model or LoRA adapter"
        assert statuses(second.base_url) == {"from-api": ("api", "refused", taken),
                                             "deep": ("api", "refused", NOT_AT_2),
                                             "from-file": (str(good), "served", None)}
        models = [m["id"] for m in httpx.get(f"{second.base_url}/v1/models", headers=AUTH).json()["data"]]
        assert models == ["tiny", "from-api", "from-file"]
        deep = httpx.post(f"{second.base_url}/v1/chat/completions", headers=AUTH, timeout=300, json={
            "model": "deep", "messages": PROMPT, "max_tokens": 2})
        assert deep.status_code == 400 and deep.json()["error"] == {
            "message": f"steering preset 'deep' is not served here: {NOT_AT_2}", "type": "invalid_request_error",
            "param": "model", "code": "preset_unusable"}
        plain = httpx.post(f"{second.base_url}/v1/chat/completions", headers=AUTH, timeout=300, json={
            "model": "from-api", "messages": PROMPT, "max_tokens": 2}).json()
        assert (plain["model"], "steering" in plain) == ("tiny", False)  # the served model, not the preset
        log = second.log_tail(10**6)
        assert f"steering preset 'deep' (api) is not served: {NOT_AT_2}" in log
        assert f"steering preset 'from-api' (api) is not served: {taken}" in log
        assert "serving 1 of 3 stored steering presets" in log
    bad = tmp_path / "bad.yaml"
    bad.write_text("far: {features: [{layer: 7, index: 0, mode: add, value: 1}]}\n")
    with pytest.raises(ServerStartError) as failed:
        start_server([*args, "--steering-presets", str(bad)], tmp_path / "third.log").stop()
    assert (f"--steering-presets {bad}: preset 'far': steering.features[0].layer: no SAE is loaded at layer 7"
            in str(failed.value))


def test_a_presets_file_that_is_not_a_mapping_stops_serve_before_vllm(tiny_model_dir, tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- german\n")
    result = serve(str(tiny_model_dir), "--steering-presets", str(listing))
    assert result.returncode != 0
    assert f"error: --steering-presets: {listing}: expected a mapping of preset name -> steering spec" in result.stderr
