"""What `pip install .` installs: the two import packages steerserve names (never a generic
`server`, nor the repository's models/ or tests/), with every module and data file they need."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT

PACKAGE_DIRS = {"steerserve": "server/steerserve", "steerserve_sae": "sae_plugins/steerserve_sae"}  # import name -> folder


def _folder_modules(folder: str) -> set[str]:
    """The files a wheel must hold for `folder`, under its import name."""
    name = next(n for n, f in PACKAGE_DIRS.items() if f == folder)
    return {f"{name}/{p.relative_to(ROOT / folder).as_posix()}" for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    """A wheel built offline with the venv's setuptools, from a copy of the sources (a build in
    the working tree would leave build/ behind, whose stale files later builds would ship)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("steerserve-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_the_wheel_installs_only_steerserves_two_packages(wheel):
    names = wheel.namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert {n.split("/")[0] for n in names} - {dist_info} == {"steerserve", "steerserve_sae"}
    assert wheel.read(f"{dist_info}/top_level.txt").decode().split() == ["steerserve", "steerserve_sae"]
    assert "[console_scripts]\nsteerserve = steerserve.cli:main" in wheel.read(f"{dist_info}/entry_points.txt").decode()


def test_the_wheel_holds_every_module_and_the_data_files(wheel):
    names = set(wheel.namelist())
    assert _folder_modules("server/steerserve") | _folder_modules("sae_plugins/steerserve_sae") <= names
    assert "steerserve_sae/backends/kernels/steer_rows_cpu.cpp" in names  # built on first use
    assert "steerserve/analysis/data/eval_texts.txt" in names  # eval's default text sample
    assert "steerserve/analysis/steering_bench/instructions.jsonl" in names  # bench-steering's built-in instructions


def test_every_package_folder_is_named_as_it_is_imported():
    """A reader following `from steerserve.x import y` finds server/steerserve/x.py without a mapping."""
    assert all(folder.rsplit("/", 1)[-1] == name for name, folder in PACKAGE_DIRS.items())


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == PACKAGE_DIRS
    expected = {".".join([name, *p.parent.relative_to(ROOT / folder).parts])
                for name, folder in PACKAGE_DIRS.items() for p in (ROOT / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == expected
