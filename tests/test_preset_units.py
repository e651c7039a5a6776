"""Steering presets without an engine: the SQLite store, the --steering-presets file, and how a
request naming a preset is resolved (server/steerserve/steering/presets.py)."""

from __future__ import annotations

import threading

import pytest

from steerserve.context import SteeringContext
from steerserve.errors import APIError
from steerserve.steering.admission import ConfigAdmission
from steerserve.steering.presets import Preset, PresetCheck, PresetStore, resolve_model, seed_from_file

GERMAN = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}


def context() -> SteeringContext:
    """One SAE at layer 1, served as "tiny", with a LoRA adapter "tiny-lora"."""
    return SteeringContext(saes=[{"layer": 1, "d_sae": 1024, "d_model": 64}], max_features=4,
                           admission=ConfigAdmission(4), served_model="tiny", served_models=("tiny",),
                           adapters=lambda: ("tiny-lora",))


def resolve(body: dict, store: PresetStore) -> tuple[dict, Preset | None]:
    return resolve_model(body, store, PresetCheck(context()), "tiny")


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
    resolved, preset = resolve(body, store)
    assert preset.name == "german"
    assert resolved == {"model": "tiny", "messages": [], "steering": GERMAN}
    assert body["model"] == "german"  # the client's payload is not changed in place
    assert resolve({"model": "tiny"}, store) == ({"model": "tiny"}, None)
    assert resolve({"model": "other"}, store) == ({"model": "other"}, None)


def test_inline_steering_adds_to_the_preset_first_so_error_paths_point_at_it(tmp_path):
    store = PresetStore(tmp_path)
    store.put(Preset("german", GERMAN, None, 7, "api"), replace=False)
    extra = {"layer": 1, "index": 4, "mode": "ablate"}
    resolved, _ = resolve({"model": "german", "steering": {"features": [extra], "compare": True}}, store)
    assert resolved["steering"] == {"features": [extra, *GERMAN["features"]], "compare": True}
    with pytest.raises(APIError) as conflict:
        resolve({"model": "german", "steering": {"features": [extra, {"layer": 1, "index": 3, "mode": "scale",
                                                                           "value": 2}]}}, store)
    assert (conflict.value.code, conflict.value.param) == ("preset_conflict", "steering.features[1]")
    assert "feature 3 at layer 1" in conflict.value.message and "'german'" in conflict.value.message
    with pytest.raises(APIError) as apply_to:
        resolve({"model": "german", "steering": {"apply_to": "prompt"}}, store)
    assert (apply_to.value.code, apply_to.value.param) == ("preset_conflict", "steering.apply_to")
    bad, _ = resolve({"model": "german", "steering": [1]}, store)
    assert bad["steering"] == [1]  # refused later by the inline field's own validation


def test_a_presets_file_seeds_the_store_and_names_what_is_wrong(tmp_path):
    store = PresetStore(tmp_path / "data")
    good = tmp_path / "presets.yaml"
    good.write_text("german:\n  description: speaks German\n  steering:\n    features:\n"
                    "      - {layer: 1, index: 3, mode: add, value: 8}\nquiet: {features: [{layer: 1, index: 5, "
                    "mode: ablate}]}\n")
    assert seed_from_file(store, good, context()) == 2
    assert store.get("german").description == "speaks German" and store.get("german").source == str(good)
    assert store.get("quiet").steering == {"features": [{"layer": 1, "index": 5, "mode": "ablate"}]}
    for text, message in [
        ("bad: {features: [{layer: 7, index: 0, mode: add, value: 1}]}",
         "preset 'bad': steering.features[0].layer: no SAE is loaded at layer 7"),
        ("bad: {features: [{layer: 1, index: 4096, mode: add, value: 1}]}", "steering.features[0].index"),
        ("bad: {features: [{layer: 1, index: 1, mode: add, value: 1}], compare: true}", "steering.compare"),
        ("tiny: {features: [{layer: 1, index: 1, mode: add, value: 1}]}",
         "preset 'tiny': the name is a served model's or LoRA adapter's"),
        ("tiny-lora: {features: [{layer: 1, index: 1, mode: add, value: 1}]}",
         "preset 'tiny-lora': the name is a served model's or LoRA adapter's"),
        (f"long: {{description: {'x' * 1001}, steering: {{features: [{{layer: 1, index: 1, mode: add, value: 1}}]}}}}",
         "preset 'long': description: description is 1001 characters; this server takes at most 1000"),
        ("'no spaces': {features: []}", "preset 'no spaces': a preset name is 1 to 64 characters"),
        ("- a list", "expected a mapping of preset name -> steering spec"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ValueError) as error:
            seed_from_file(store, path, context())
        assert str(error.value).startswith(str(path)) and message in str(error.value), str(error.value)


def test_the_count_limit_holds_across_stores_sharing_a_data_dir(tmp_path):
    """Two API processes' stores, 40 creations at once, room for 5: exactly 5 are stored, the
    others refused with too_many_presets; a name already taken is still a plain False (409)."""
    stores = [PresetStore(tmp_path), PresetStore(tmp_path)]
    outcomes: list[str] = []
    start = threading.Barrier(40)

    def create(i: int) -> None:
        start.wait()
        try:
            stored = stores[i % 2].put(Preset(f"p{i}", GERMAN, None, 7, "api"), replace=False, max_count=5)
            outcomes.append("stored" if stored else "taken")
        except APIError as error:
            outcomes.append(error.code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["stored"] * 5 + ["too_many_presets"] * 35
    assert len(stores[0].all()) == 5
    kept = stores[1].all()[0]
    assert stores[0].put(kept, replace=False, max_count=5) is False
    assert stores[0].put(kept, replace=True, max_count=5) is True  # a replacement adds nothing


def test_a_stored_preset_is_rechecked_against_this_server(tmp_path):
    """Served, refused for a spec that no longer fits (request: 400 preset_unusable), or for a name
    a served model or LoRA adapter took (request: that model's, the preset ignored)."""
    store, check = PresetStore(tmp_path), PresetCheck(context())
    for name, steering in [("german", GERMAN), ("deep", {"features": [{"layer": 2, "index": 3, "mode": "ablate"}]}),
                           ("tiny-lora", GERMAN)]:
        store.put(Preset(name, steering, None, 7, "api"), replace=False)
    assert {p.name: check.refusal(p) for p in store.all()} == {
        "deep": "layer_not_loaded: steering.features[0].layer: no SAE is loaded at layer 2; loaded layers: [1]",
        "german": None,
        "tiny-lora": "model_name_taken: 'tiny-lora' is the name of a served model or LoRA adapter"}
    assert [p.name for p in check.served(store.all())] == ["german"]
    with pytest.raises(APIError) as unusable:
        resolve_model({"model": "deep"}, store, check, "tiny")
    assert (unusable.value.status, unusable.value.param, unusable.value.code, unusable.value.message) == (
        400, "model", "preset_unusable", "steering preset 'deep' is not served here: layer_not_loaded: "
        "steering.features[0].layer: no SAE is loaded at layer 2; loaded layers: [1]")
    assert resolve_model({"model": "tiny-lora"}, store, check, "tiny") == ({"model": "tiny-lora"}, None)


def test_deleting_presets_gives_their_space_back(tmp_path):
    def size() -> int:
        return sum(f.stat().st_size for f in tmp_path.iterdir())

    store = PresetStore(tmp_path)
    store.put(Preset("big", GERMAN, "x" * (4 << 20), 7, "api"), replace=False)
    store.close()
    assert size() > 4 << 20
    store = PresetStore(tmp_path)
    assert store.delete("big")
    store.close()
    assert size() < 64 << 10
