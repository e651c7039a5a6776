"""Steering presets without an engine: the SQLite store, the --steering-presets file, and how a
request naming a preset is resolved (server/steering/presets.py)."""

from __future__ import annotations

import pytest

from steerserve.context import SteeringContext
from steerserve.errors import APIError
from steerserve.steering.admission import ConfigAdmission
from steerserve.steering.presets import Preset, PresetStore, resolve_model, seed_from_file

GERMAN = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}


def context() -> SteeringContext:
    return SteeringContext(saes=[{"layer": 1, "d_sae": 1024, "d_model": 64}], max_features=4,
                           admission=ConfigAdmission(4), served_model="tiny", served_models=("tiny",))


def test_presets_are_durable_and_shared_by_stores_on_one_data_dir(tmp_path):
    first, second = PresetStore(tmp_path), PresetStore(tmp_path)
    assert first.put(Preset("german", GERMAN, "speaks German", 7, "api"), replace=False)
    assert not first.put(Preset("german", {}, None, 8, "api"), replace=False)  # taken
    assert second.get("german") == Preset("german", GERMAN, "speaks German", 7, "api")
    first.close()
    reopened = PresetStore(tmp_path)
    assert [p.name for p in reopened.all()] == ["german"]
    assert reopened.delete("german") and not reopened.delete("german")
    assert second.get("german") is None


def test_a_preset_model_is_the_served_model_steered_by_the_preset(tmp_path):
    store = PresetStore(tmp_path)
    store.put(Preset("german", GERMAN, None, 7, "api"), replace=False)
    body = {"model": "german", "messages": [], "steering": None}
    resolved, preset = resolve_model(body, store, "tiny")
    assert preset.name == "german"
    assert resolved == {"model": "tiny", "messages": [], "steering": GERMAN}
    assert body["model"] == "german"  # the client's payload is not changed in place
    assert resolve_model({"model": "tiny"}, store, "tiny") == ({"model": "tiny"}, None)
    assert resolve_model({"model": "other"}, store, "tiny") == ({"model": "other"}, None)


def test_inline_steering_adds_to_the_preset_first_so_error_paths_point_at_it(tmp_path):
    store = PresetStore(tmp_path)
    store.put(Preset("german", GERMAN, None, 7, "api"), replace=False)
    extra = {"layer": 1, "index": 4, "mode": "ablate"}
    resolved, _ = resolve_model({"model": "german", "steering": {"features": [extra], "compare": True}}, store, "tiny")
    assert resolved["steering"] == {"features": [extra, *GERMAN["features"]], "compare": True}
    with pytest.raises(APIError) as conflict:
        resolve_model({"model": "german", "steering": {"features": [extra, {"layer": 1, "index": 3, "mode": "scale",
                                                                           "value": 2}]}}, store, "tiny")
    assert (conflict.value.code, conflict.value.param) == ("preset_conflict", "steering.features[1]")
    assert "feature 3 at layer 1" in conflict.value.message and "'german'" in conflict.value.message
    with pytest.raises(APIError) as apply_to:
        resolve_model({"model": "german", "steering": {"apply_to": "prompt"}}, store, "tiny")
    assert (apply_to.value.code, apply_to.value.param) == ("preset_conflict", "steering.apply_to")
    bad, _ = resolve_model({"model": "german", "steering": [1]}, store, "tiny")
    assert bad["steering"] == [1]  # refused later by the inline field's own validation


def test_a_presets_file_seeds_the_store_and_names_what_is_wrong(tmp_path):
    store = PresetStore(tmp_path / "data")
    good = tmp_path / "presets.yaml"
    good.write_text("german:\n  description: speaks German\n  steering:\n    features:\n"
                    "      - {layer: 1, index: 3, mode: add, value: 8}\nquiet: {features: [{layer: 1, index: 5, "
                    "mode: ablate}]}\n")
    assert seed_from_file(store, good, context(), {"tiny"}) == 2
    assert store.get("german").description == "speaks German" and store.get("german").source == str(good)
    assert store.get("quiet").steering == {"features": [{"layer": 1, "index": 5, "mode": "ablate"}]}
    for text, message in [
        ("bad: {features: [{layer: 7, index: 0, mode: add, value: 1}]}",
         "preset 'bad': steering.features[0].layer: no SAE is loaded at layer 7"),
        ("bad: {features: [{layer: 1, index: 4096, mode: add, value: 1}]}", "steering.features[0].index"),
        ("bad: {features: [{layer: 1, index: 1, mode: add, value: 1}], compare: true}", "steering.compare"),
        ("tiny: {features: [{layer: 1, index: 1, mode: add, value: 1}]}", "preset 'tiny': the name is a served model's"),
        ("'no spaces': {features: []}", "preset 'no spaces': a preset name is 1 to 64 characters"),
        ("- a list", "expected a mapping of preset name -> steering spec"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ValueError) as error:
            seed_from_file(store, path, context(), {"tiny"})
        assert str(error.value).startswith(str(path)) and message in str(error.value), str(error.value)
