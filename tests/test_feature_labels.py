"""Labels files: loading, ranking, and every way a file can be bad (no engine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steerserve.analysis.feature_labels import LabelsFileError, load_labels
from tests.conftest import ROOT, server_env


def write(tmp_path, lines):
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_and_get(tmp_path):
    labels = load_labels(write(tmp_path, [{"layer": 1, "index": 2, "label": "sea"}, "",
                                          {"layer": 1, "index": 3, "label": "boats", "description": "ships"}]))
    assert len(labels) == 2
    assert labels.get(1, 3).description == "ships" and labels.get(1, 4) is None


@pytest.mark.parametrize("lines,message", [
    ([{"layer": 1, "index": 2, "label": "a"}, "{oops"], "labels.jsonl:2: not valid JSON"),
    ([{"layer": 1, "index": 2}], "labels.jsonl:1: 'label' must be a string"),
    ([{"layer": "1", "index": 2, "label": "a"}], "labels.jsonl:1: 'layer' must be an integer"),
    ([{"layer": 1, "index": True, "label": "a"}], "labels.jsonl:1: 'index' must be an integer"),
    ([[1, 2, "a"]], "labels.jsonl:1: expected an object"),
    ([{"layer": 1, "index": 2, "label": "a", "description": 5}], "'description' must be a string"),
    ([{"layer": 1, "index": 2, "label": "a"}, {"layer": 1, "index": 2, "label": "b"}],
     "labels.jsonl:2: layer 1 feature 2 is already labelled on line 1"),
])
def test_bad_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(LabelsFileError, match=message.replace("[", r"\[")):
        load_labels(write(tmp_path, lines))


def test_missing_file(tmp_path):
    with pytest.raises(LabelsFileError, match="cannot read"):
        load_labels(tmp_path / "nope.jsonl")


def test_server_refuses_to_start_with_a_bad_labels_file(tmp_path, tiny_model_dir):
    bad = write(tmp_path, ["not json"])
    result = subprocess.run(
        [sys.executable, "-m", "steerserve", "serve", str(tiny_model_dir), "--feature-labels", str(bad), "--port", "1"],
        capture_output=True, text=True, env=server_env(), cwd=ROOT, timeout=300,
    )
    assert result.returncode != 0
    assert "--feature-labels" in result.stderr and "labels.jsonl:1: not valid JSON" in result.stderr
