"""The feature-dashboards file without an engine: what `serve --feature-dashboards` refuses, and a
resumed run with other settings (issue 24)."""

from __future__ import annotations

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
