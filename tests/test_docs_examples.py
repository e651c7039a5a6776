"""Every executed example of the README and the docs site, run against the shipped default model's
server (the `default_server` that test_default_model.py and test_playground.py share), its pasted
output compared with what it prints now. How examples are marked, the rewriting of address and
key, and the tolerances: tests/doc_examples.py."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.conftest import API_KEY, AUTH
from tests.doc_examples import Target, examples

EXAMPLES = examples()


def test_the_docs_have_executed_examples():
    """The marker is not silently lost: the README's German example (curl and the openai client)
    and the examples of the steering, trace and analysis pages are found."""
    names = [name for name, _ in EXAMPLES]
    assert sum(name.startswith("README.md:") for name in names) >= 3, names
    for page in ("docs/getting-started.md", "docs/steering/gates.md", "docs/steering/presets.md",
                 "docs/traces.md", "docs/analysis.md"):
        assert any(name.startswith(page + ":") for name in names), (page, names)


@pytest.fixture(scope="module")
def target(default_server):
    """The default server; the presets and vectors that examples store are deleted afterwards."""
    with httpx.Client(base_url=default_server.base_url, headers=AUTH, timeout=60) as http:
        before = {kind: {row["name"] for row in http.get(f"/v1/steering/{kind}").json()["data"]}
                  for kind in ("presets", "vectors")}
        yield Target(default_server.base_url, API_KEY)
        for kind in ("presets", "vectors"):
            for row in http.get(f"/v1/steering/{kind}").json()["data"]:
                if row["name"] not in before[kind]:
                    http.delete(f"/v1/steering/{kind}/{row['name']}")


@pytest.mark.parametrize("example", [e for _, e in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_example(example, target):
    if "jq " in example.parsed.source and shutil.which("jq") is None:
        pytest.skip("jq is not installed (apt-get install jq): this example pipes curl into it")
    example.namespace["target"] = target
    example.evaluate()
