"""The documentation's executed examples: how they are found (with Sybil) and how a pasted output is
compared with what the example prints now.

An executed example is a fenced `bash` or `python` block followed directly by a block whose info
line carries `title="Output"` or `title="Output (numbers within 1%)"` (MkDocs Material shows the
title above it):

    ```bash
    curl -s localhost:8000/v1/features/search?q=German | jq -c '.data[0].index'
    ```
    ```json title="Output"
    424
    ```

The examples are written for `make serve` (port 8000, no API key). The suite's default server
listens elsewhere and requires a key, so before running an example the runner points
`localhost:8000` / `127.0.0.1:8000` at it and adds the key: curl through a shell function that
sends the header, Python by replacing the literals `api_key="unused"` (openai) and
`auth_token="unused"` (anthropic). Nothing else is rewritten.

Comparison, by the output block's language:
- `json`: the printed text and the pasted text are each read as a sequence of JSON values (`jq -c`
  prints one a line) and compared value by value. Strings, booleans, null and integers are exact
  (generated text, ids, indices, counts); a pasted string ending in `...` matches any string it
  begins (long descriptions); a number that is a float on either side matches within 1% of the
  pasted value or 0.01, whichever is larger (activations are pasted rounded). A list whose last
  pasted element is the string `"..."` allows more elements after the ones pasted; an object with
  the key `"..."` allows keys that are not pasted. Every other key and element must be there.
- `text`: exact, but for trailing whitespace at the end; a last pasted line `...` allows more
  lines after the pasted ones (a timing printed last). Titled `Output (numbers within 1%)` (a
  measured table), every word that reads as a decimal number (a trailing % allowed) matches
  within 1% of the pasted value or 0.01, whichever is larger; the other words stay exact.

Bash examples run in a temporary directory (what they write stays out of the tree), with the
Python environment's scripts (`steerserve`) on PATH and VLLM_API_KEY set to the key, which
steerserve's own client commands (`eval`, `dashboards`, `bench-steering` with `--base-url`) send.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_TITLE = 'title="Output'  # "Output", or "Output (numbers within 1%)"
TOLERANT = "numbers within 1%"
MAKE_SERVE = re.compile(r"(?:localhost|127\.0\.0\.1):8000")
ELLIPSIS = "..."
FLOAT_REL, FLOAT_ABS = 0.01, 0.01


def documents() -> list[Path]:
    """The README and every page of the site, in a fixed order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass
class Target:
    """Where the examples run: the server's base URL (http://host:port) and its API key."""

    base_url: str
    api_key: str


@dataclass
class Pasted:
    language: str  # bash or python
    source: str
    output_language: str  # json or text
    output: str
    tolerant_numbers: bool = False  # title="Output (numbers within 1%)" on a text output


_lexer = RawFencedCodeBlockLexer(info_pattern=re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE))


def parse_examples(document: Document):
    """One Region per command block that is directly followed by an Output block."""
    previous = None
    for region in _lexer(document):
        info = region.lexemes["info"].strip()
        if OUTPUT_TITLE in info and previous is not None:
            command_info = previous.lexemes["info"].split()
            between = document.text[previous.end:region.start]
            if command_info and command_info[0] in ("bash", "python") and not between.strip():
                parsed = Pasted(command_info[0], str(previous.lexemes["source"]),
                                info.split()[0], str(region.lexemes["source"]), TOLERANT in info)
                yield Region(previous.start, region.end, parsed, evaluate)
        previous = region


SYBIL = Sybil(parsers=[parse_examples])


def examples() -> list[tuple[str, Example]]:
    """(a readable id, the example) for every executed example of the docs."""
    found = []
    for path in documents():
        document = SYBIL.parse(path)
        for example in document:
            found.append((f"{path.relative_to(ROOT)}:{example.line}", example))
    return found


def run_bash(source: str, target: Target) -> str:
    prelude = ('set -o pipefail\n'
               'curl() { command curl -H "Authorization: Bearer $STEERSERVE_DOCS_KEY" "$@"; }\n')
    host = target.base_url.split("://", 1)[1]
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/local/bin"
    with tempfile.TemporaryDirectory(prefix="docs-example-") as cwd:
        result = subprocess.run(["bash", "-c", prelude + MAKE_SERVE.sub(host, source)], capture_output=True, text=True,
                                timeout=300, cwd=cwd, env={"PATH": path, "HOME": cwd, "STEERSERVE_DOCS_KEY": target.api_key,
                                                           "VLLM_API_KEY": target.api_key})
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr}"
    return result.stdout


def run_python(source: str, target: Target) -> str:
    host = target.base_url.split("://", 1)[1]
    code = MAKE_SERVE.sub(host, source).replace('api_key="unused"', f'api_key="{target.api_key}"')
    code = code.replace('auth_token="unused"', f'auth_token="{target.api_key}"')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs_example__"})
    return printed.getvalue()


def evaluate(example: Example) -> None:
    pasted: Pasted = example.parsed
    target: Target = example.namespace["target"]
    printed = (run_bash if pasted.language == "bash" else run_python)(pasted.source, target)
    if pasted.output_language == "json":
        problems = compare(json_values(pasted.output), json_values(printed), "output")
    else:
        problems = compare_text(pasted.output, printed, pasted.tolerant_numbers)
    assert not problems, "pasted output no longer matches:\n  " + "\n  ".join(problems) + f"\nprinted now:\n{printed}"


def compare_text(pasted: str, printed: str, tolerant_numbers: bool) -> list[str]:
    want, got = pasted.rstrip().split("\n"), printed.rstrip().split("\n")
    if want[-1] == ELLIPSIS:
        want, got = want[:-1], got[: len(want) - 1]
    if len(want) != len(got):
        return [f"{len(want)} lines pasted, {len(got)} printed"]
    problems = []
    for i, (a, b) in enumerate(zip(want, got), 1):
        if a.rstrip() == b.rstrip():
            continue
        words_a, words_b = a.split(), b.split()
        if not tolerant_numbers or len(words_a) != len(words_b) or not all(
                x == y or _close(x, y) for x, y in zip(words_a, words_b)):
            problems.append(f"line {i}: pasted {a!r}, printed {b!r}")
    return problems


def _close(pasted: str, printed: str) -> bool:
    number = re.compile(r"-?\d+\.\d+%?")
    if not (number.fullmatch(pasted) and number.fullmatch(printed)) or pasted.endswith("%") != printed.endswith("%"):
        return False
    a, b = float(pasted.rstrip("%")), float(printed.rstrip("%"))
    return abs(b - a) <= max(FLOAT_ABS, FLOAT_REL * abs(a))


def json_values(text: str) -> list:
    decoder, values, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return values


def compare(pasted, actual, path: str) -> list[str]:
    """The differences between a pasted JSON value and the printed one (empty: they match)."""
    if isinstance(pasted, dict):
        if not isinstance(actual, dict):
            return [f"{path}: pasted an object, got {actual!r}"]
        problems = []
        open_ended = pasted.get(ELLIPSIS) == ELLIPSIS
        for key, value in pasted.items():
            if key == ELLIPSIS:
                continue
            if key not in actual:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += compare(value, actual[key], f"{path}.{key}")
        extra = sorted(set(actual) - set(pasted))
        if extra and not open_ended:
            problems.append(f"{path}: keys not pasted {extra}")
        return problems
    if isinstance(pasted, list):
        if not isinstance(actual, list):
            return [f"{path}: pasted a list, got {actual!r}"]
        open_ended = bool(pasted) and pasted[-1] == ELLIPSIS
        items = pasted[:-1] if open_ended else pasted
        if len(actual) < len(items) or (not open_ended and len(actual) != len(items)):
            return [f"{path}: {len(items)} elements pasted, {len(actual)} printed"]
        return [p for i, item in enumerate(items) for p in compare(item, actual[i], f"{path}[{i}]")]
    if isinstance(pasted, str) and pasted.endswith(ELLIPSIS) and isinstance(actual, str):
        ok = actual.startswith(pasted[: -len(ELLIPSIS)])
        return [] if ok else [f"{path}: {actual!r} does not begin {pasted[:-3]!r}"]
    numbers = (int, float)
    if (isinstance(pasted, numbers) and isinstance(actual, numbers) and not isinstance(pasted, bool)
            and not isinstance(actual, bool) and (isinstance(pasted, float) or isinstance(actual, float))):
        ok = abs(actual - pasted) <= max(FLOAT_ABS, FLOAT_REL * abs(pasted))
        return [] if ok else [f"{path}: pasted {pasted}, printed {actual}"]
    if type(pasted) is not type(actual) or pasted != actual:
        return [f"{path}: pasted {pasted!r}, printed {actual!r}"]
    return []
