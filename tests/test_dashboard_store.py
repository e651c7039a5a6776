"""The feature-dashboards file without an engine: what `serve --feature-dashboards` refuses, and a
resumed run with other settings (issue 24)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerserve.analysis.dashboard_store import DashboardFileError, DashboardStore, FeatureDashboard, feature_fields


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(DashboardFileError, match="no such file"):
        DashboardStore(tmp_path / "missing.db", readonly=True)
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    with pytest.raises(DashboardFileError, match="not a feature-dashboards file"):
        DashboardStore(tmp_path / "notes.db", readonly=True)


def test_resume_needs_the_same_settings_and_fields_trim_the_histogram(tmp_path):
    settings = {"model": "m", "layers": [3], "top_n": 2, "edges": [1.0, 2.0, 4.0, 8.0], "bins": 3, "before": 1}
    store = DashboardStore(tmp_path / "d.db")
    store.start(settings)
    example = {"activation": 5.0, "doc": 0, "position": 1, "tokens": ["a", "b"], "activations": [0.0, 5.0]}
    store.commit_batch([0, 1], {3: 10}, {3: {7: FeatureDashboard(2, 8.0, 5.0, [0, 1, 1], [example])}})
    store.close()
    with pytest.raises(DashboardFileError, match="top_n"):
        DashboardStore(tmp_path / "d.db").start(settings | {"top_n": 20})
    served = DashboardStore(tmp_path / "d.db", readonly=True)
    assert served.done_docs() == {0, 1}
    assert feature_fields(served, 3, 7) == {
        "firing_rate": 0.2, "mean_activation": 4.0, "max_activation": 5.0,
        "histogram": {"edges": [2.0, 4.0, 8.0], "counts": [1, 1]},
        "top_examples": [{"tokens": ["a", "b"], "activations": [0.0, 5.0]}]}
    assert feature_fields(served, 3, 8)["histogram"] == {"edges": [], "counts": []}
    assert feature_fields(served, 2, 7) == {}  # a layer the file does not cover


def test_accumulator_counts_firings_per_group_on_grouped_positions_only():
    import torch

    from steerserve_sae.capture.dashboards import DashboardAccumulator
    from steerserve_sae.protocol.capture import DashboardSpec

    spec = DashboardSpec(0, top_n=2, before=1, after=1, bins=4, low=1e-2, high=1e2, groups=2)
    acc = DashboardAccumulator(3, spec, torch.device("cpu"))
    f = torch.tensor([[1.0, 0, 0], [2.0, 3.0, 0], [0, 1.0, 0], [4.0, 0, 5.0]])
    counted = torch.tensor([False, True, True, True])  # row 0: a special token
    acc.add(f[:2], 0, 0, counted[:2], group=1, ungrouped=frozenset({2}))  # two chunks of one document
    acc.add(f[2:], 0, 2, counted[2:], group=1, ungrouped=frozenset({2}))
    acc.add(f[1:2], 1, 0, counted[1:2])  # a document without a group counts for none
    result = acc.result()
    fired = np.frombuffer(result["group_fired"], dtype="<i8").reshape(-1, 2)
    assert result["group_tokens"] == [0, 2]  # rows 1 and 3 of document 0
    np.testing.assert_array_equal(fired, [[0, 2], [0, 1], [0, 1]])
    assert np.frombuffer(result["fired"], dtype="<i8").tolist() == [3, 3, 1]


def test_labels_name_a_groups_strongest_feature_and_report_its_rates(tmp_path):
    from steerserve.analysis.dashboards import group_features, write_labels

    store = DashboardStore(tmp_path / "d.db")
    store.start({"model": "m", "layers": [3], "top_n": 1, "edges": [1.0, 2.0], "bins": 1, "before": 0})

    def feature(fired: int, groups: dict, token: str) -> FeatureDashboard:
        example = {"activation": 2.0, "doc": 0, "position": 0, "tokens": [token], "activations": [2.0]}
        return FeatureDashboard(fired, 2.0 * fired, 2.0, [fired], [example], groups)

    store.commit_batch([0], {3: 400}, {3: {
        1: feature(70, {"de": 60, "en": 5}, "der"),  # 60% of German, 5% of English: German's feature
        2: feature(70, {"de": 55, "en": 12}, "die"),  # fires on most German, but on English too
        3: feature(40, {"de": 30, "en": 3}, "das"),  # German-leaning at a lower rate
        4: feature(30, {"de": 25, "en": 15}, "ist"),  # German-leaning, rates too low to name
        5: feature(20, {"de": 8, "en": 9}, ","),  # neither
        6: feature(40, {"de": 3, "en": 35}, "the")}},  # English's strongest, 35% of English: named
        {3: {"de": 100, "en": 100}})
    found = group_features(store, 3)
    assert found["de"] == {"index": 1, "qualifies": True, "rate_in_group": 0.6, "max_rate_elsewhere": 0.05,
                           "rates": {"de": 0.6, "en": 0.05}, "mean_activation": 2.0}
    assert (found["en"]["index"], found["en"]["qualifies"], found["en"]["rate_in_group"]) == (6, False, 0.35)
    write_labels(store, tmp_path / "labels.jsonl")
    labels = {r["index"]: r for r in map(json.loads, (tmp_path / "labels.jsonl").read_text().splitlines())}
    assert {i: r["label"] for i, r in labels.items()} == {
        1: "de", 2: "de text: 'die'", 3: "'das' (de)", 4: "'ist'", 5: "','", 6: "en"}
    # only the groups it fires on >= 10% of are named, so a search for a group's name finds those
    assert "; rate by group: de 60% (others below 10%); " in labels[1]["description"]
    assert "; rate by group: en 15%, de 25%" not in labels[4]["description"]
    assert "; rate by group: de 25%, en 15%; " in labels[4]["description"]
    assert "; below 10% in every group; " in labels[5]["description"]
    assert "en 5%" not in labels[1]["description"] and "de 8%" not in labels[5]["description"]


def test_documents_take_their_group_from_the_named_field(tmp_path, capsys):
    from steerserve.analysis.dashboards import read_documents

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "Guten Tag", "lang": "de"}\n{"text": "Hello", "group": "en"}\n')
    assert read_documents(path, "lang") == [{"prompt": "Guten Tag", "group": "de"}, {"prompt": "Hello"}]
    assert read_documents(path) == [{"prompt": "Guten Tag"}, {"prompt": "Hello", "group": "en"}]
    path.write_text('{"text": "x", "lang": 3}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:1: `lang` must be a non-empty string"):
        read_documents(path, "lang")
    from steerserve.analysis.dashboards import main

    assert main(["--data", str(path), "--group-field", "lang", "--layers", "3", "--output", str(tmp_path / "d.db"),
                 "--base-url", "http://127.0.0.1:9"]) == 1  # refused before any server is asked
    assert "dashboards: " in capsys.readouterr().err


def test_search_index_beyond_its_byte_budget_reads_the_rest_from_the_file(tmp_path):
    """The index holds example text up to `max_bytes`; a search still finds every feature (the
    rest read from the file in the search's thread), with the same answer as an unbounded index.
    A file that changes is answered from the previous index until the rebuild is in."""
    import asyncio

    from steerserve.analysis.dashboard_store import DashboardIndex

    store = DashboardStore(tmp_path / "d.db")
    store.start({"model": "m", "layers": [2, 3], "top_n": 2, "edges": [1.0, 2.0], "bins": 1, "before": 0})

    def example(*tokens: str) -> dict:
        return {"activation": 1.0, "doc": 0, "position": 0, "tokens": list(tokens), "activations": [1.0] * len(tokens)}

    store.commit_batch([0], {2: 5, 3: 5}, {layer: {i: FeatureDashboard(1, 1.0, 1.0, [1], [
        example("Ä", "pfel"), example(f"x{i}", " äpfel äPFEL")]) for i in range(6)} for layer in (2, 3)})
    small = DashboardIndex(DashboardStore(tmp_path / "d.db", readonly=True), max_bytes=300)
    whole = DashboardIndex(DashboardStore(tmp_path / "d.db", readonly=True))

    async def searches(index: DashboardIndex) -> list:
        return [await index.search(q, layer) for q, layer in (("ÄPFEL", None), ("x4", 3), ("x4", None), ("zz", None))]

    got = asyncio.run(searches(small))
    assert got == asyncio.run(searches(whole))
    assert got[0] == [(layer, i, 3) for layer in (2, 3) for i in range(6)] and got[1] == [(3, 4, 1)]
    assert got[2] == [(2, 4, 1), (3, 4, 1)] and got[3] == []
    assert sum(map(len, small._index.texts.values())) == 3 and small._index.rest == (2, 3)  # ~100 bytes each
    assert whole._index.rest is None

    async def stale_then_fresh() -> tuple:
        store.commit_batch([1], {}, {3: {9: FeatureDashboard(1, 1.0, 1.0, [1], [example("x4")])}})
        stale = await whole.search("x4", 3)
        await whole._rebuild
        return stale, await whole.search("x4", 3)

    assert asyncio.run(stale_then_fresh()) == ([(3, 4, 1)], [(3, 4, 1), (3, 9, 1)])
