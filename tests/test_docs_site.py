"""The documentation site builds strictly (every page in the navigation, every link and anchor
resolving), and the comparison of pasted outputs in tests/doc_examples.py does what it says. The
examples themselves run in test_docs_examples.py, against the default model's server."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sybil import Sybil

from tests.doc_examples import ROOT, compare, compare_text, json_values, parse_examples


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-5000:]
    for page in ("index.html", "getting-started/index.html", "steering/gates/index.html", "troubleshooting/index.html",
                 "glossary/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # a fence Markdown could not read (an info line it does not take) is printed as text, not as code
    leaked = [str(p.relative_to(tmp_path)) for p in (tmp_path / "site").rglob("*.html") if "```" in p.read_text()]
    assert not leaked, leaked


def test_a_broken_link_fails_the_build(tmp_path):
    """Strictness is real: the same config with one page linking a missing one does not build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [nowhere](missing.md).\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text((ROOT / "mkdocs.yml").read_text().split("\nnav:")[0].replace("docs_dir: docs", f"docs_dir: {docs}") + "\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "missing.md" in done.stderr


@pytest.mark.parametrize(("pasted", "printed", "ok"), [
    ('{"text": "Die Welt", "index": 424}', '{"text": "Die Welt", "index": 424}', True),
    ('{"text": "Die Welt", "index": 424}', '{"text": "Die Welt!", "index": 424}', False),  # text exact
    ('{"index": 424}', '{"index": 425}', False),  # integers exact
    ('{"activation": 36.92}', '{"activation": 36.91807556}', True),  # floats within 1%
    ('{"activation": 36.92}', '{"activation": 37.5}', False),
    ('{"activation": 0}', '{"activation": 0.004}', True),  # or 0.01
    ('{"description": "fires on 22.6% ..."}', '{"description": "fires on 22.6% of tokens"}', True),
    ('{"description": "fires on 22.7% ..."}', '{"description": "fires on 22.6% of tokens"}', False),
    ('{"a": 1}', '{"a": 1, "b": 2}', False),  # keys not pasted
    ('{"a": 1, "...": "..."}', '{"a": 1, "b": 2}', True),
    ('[1, 2]', '[1, 2, 3]', False),
    ('[1, 2, "..."]', '[1, 2, 3]', True),
    ('[1, 2, "..."]', '[1]', False),
    ('"a"\n"b"', '"a"\n"b"\n', True),  # jq -c: one value a line
    ('"a"\n"b"', '"a"\n', False),
])
def test_pasted_outputs_are_compared_as_documented(pasted, printed, ok):
    problems = compare(json_values(pasted), json_values(printed), "output")  # as evaluate() calls it
    assert (not problems) is ok, problems


@pytest.mark.parametrize(("pasted", "printed", "tolerant", "ok"), [
    ("Die Welt\nsteer-1", "Die Welt\nsteer-1\n", False, True),
    ("Die Welt\nsteer-1", "Die Welt!\nsteer-1", False, False),  # greedy text exact
    ("a 0.1335 87.5%", "a 0.1336 87.5%", False, False),  # without numbers="1%": exact
    ("a 0.1335 87.5%", "a 0.1336 87.5%", True, True),
    ("a 0.1335 87.5%", "a 0.1335 83.3%", True, False),  # one greedy token more of 24
    ("a 1.02 x", "a 1.02 y", True, False),  # other words exact
    ("a 0.036 x", "a 0.040 x", True, True),  # within 0.01
    ("table\n...", "table\ntook 11.2 s", False, True),  # a last `...` line: more may follow
    ("table\n...", "tablet\ntook 11.2 s", False, False),
    ("one\ntwo", "one", False, False),
])
def test_pasted_text_is_compared_as_documented(pasted, printed, tolerant, ok):
    assert (not compare_text(pasted, printed, tolerant)) is ok


def test_an_output_block_must_follow_its_command_directly(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('```bash\necho 1\n```\n```json title="Output"\n1\n```\n\n'
                    '```bash\necho 2\n```\nsome text\n```json title="Output"\n2\n```\n\n'
                    '```bash\necho 3\n```\n```json\n3\n```\n')
    (example,) = list(Sybil(parsers=[parse_examples]).parse(page))
    assert example.parsed.source == "echo 1\n" and example.parsed.output == "1\n"
