"""Steering presets across restarts, on servers of this module's own (eager, to start quickly):
`--steering-presets FILE` seeds them, those created over HTTP survive a restart on the same
--data-dir, and a preset of the file that does not fit the loaded SAEs stops the start-up with
an error naming the file and the preset (one that is not even a mapping stops it before vLLM)."""

from __future__ import annotations

import httpx
import pytest

from steerserve.serve_process import ServerStartError
from tests.conftest import API_KEY, AUTH, PROMPT, serve_args, serving, start_server
from tests.test_cli_startup import serve

STEER = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}


def names(base_url: str) -> dict[str, str]:
    presets = httpx.get(f"{base_url}/v1/steering/presets", headers=AUTH).json()["data"]
    return {p["name"]: p["source"] for p in presets}


def test_presets_are_seeded_survive_a_restart_and_a_bad_file_stops_the_start(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    good = tmp_path / "presets.yaml"
    good.write_text("from-file:\n  description: seeded\n  steering:\n    features:\n"
                    "      - {layer: 1, index: 3, mode: add, value: 8}\n")
    args = serve_args(tiny_model_dir, "--enforce-eager", "--api-key", API_KEY, "--data-dir", str(data))
    with serving([*args, "--steering-presets", str(good)], tmp_path / "first.log") as first:
        assert names(first.base_url) == {"from-file": str(good)}
        created = httpx.post(f"{first.base_url}/v1/steering/presets", headers=AUTH,
                             json={"name": "from-api", "steering": STEER})
        assert created.status_code == 200, created.text
        chat = httpx.post(f"{first.base_url}/v1/chat/completions", headers=AUTH, timeout=300, json={
            "model": "from-file", "messages": PROMPT, "max_tokens": 2, "temperature": 0}).json()
        assert (chat["model"], chat["steering"]["preset"]) == ("from-file", "from-file")
    with serving(args, tmp_path / "second.log") as second:
        assert names(second.base_url) == {"from-api": "api", "from-file": str(good)}
        models = [m["id"] for m in httpx.get(f"{second.base_url}/v1/models", headers=AUTH).json()["data"]]
        assert models[1:] == ["from-api", "from-file"]
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
