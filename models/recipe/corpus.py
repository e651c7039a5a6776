"""The training text of the default model: Debian's fortune cookies in four languages.

No model hub or dataset host is reachable, but Debian's archive is. The `fortunes` packages are
short, varied, human-written texts (quips, proverbs, poems, dialogue, definitions) in English,
German, Spanish and Italian: enough register and language variety for features anyone can
recognise. Offensive collections (`off/`) and ASCII art are left out.

Every document keeps its language (from the package it came from), so labels can say which
language a feature fires on and tests can measure language steering.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Debian package -> language of its collections (bookworm versions pinned for reproducibility)
PACKAGES = {
    "fortunes=1:1.99.1-7.3": "en",
    "fortunes-de=0.35-1": "de",
    "fortunes-es=1.36": "es",
    "fortunes-it=1.99-4.1": "it",
}
LANGUAGES = ("en", "de", "es", "it")
LANGUAGE_NAMES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian"}
SKIPPED_COLLECTIONS = {"ascii-art", "asciiart", "banner", "translate-me"}
HELD_OUT_PER_MILLE = 50  # 5% of documents, chosen by hash of the text: stable across runs


@dataclass(frozen=True)
class Document:
    text: str
    language: str
    collection: str

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(self.text.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def download_packages(dest: Path) -> Path:
    """Fetch and unpack the pinned packages into dest (skipped when already unpacked)."""
    done = dest / ".unpacked"
    if done.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        for deb in sorted(Path(tmp).glob("*.deb")):
            name = deb.name.split("_")[0]
            target = dest / name
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    done.write_text("ok\n")
    return dest


def read_documents(unpacked: Path) -> list[Document]:
    """All fortunes, one document each, deduplicated, in a deterministic order."""
    docs: dict[str, Document] = {}
    for spec, language in PACKAGES.items():
        games = unpacked / spec.split("=")[0] / "usr/share/games/fortunes"
        for path in sorted(games.rglob("*")):
            if not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8"):
                continue
            if "off" in path.relative_to(games).parts or path.stem in SKIPPED_COLLECTIONS:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for chunk in text.split("\n%\n"):
                doc = _clean(chunk)
                if doc and doc not in docs:
                    docs[doc] = Document(doc, language, path.stem)
    return list(docs.values())


def _clean(chunk: str) -> str:
    """Strip the fortune separators and trailing whitespace; drop mostly non-letter chunks."""
    lines = [line.rstrip() for line in chunk.strip("%\n").splitlines()]
    text = "\n".join(lines).strip()
    letters = sum(c.isalpha() for c in text)
    return text if len(text) >= 20 and letters >= 0.6 * len(text.replace(" ", "").replace("\n", "")) else ""
