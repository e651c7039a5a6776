"""One class per on-disk SAE format (SAELens' shape): how to recognise it, where its layers are,
and how one layer becomes `SAEWeights`. sae/loading.py finds which format a directory holds and
dispatches to it; adding a format is one module here and one entry in loading.FORMATS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from steerserve_sae.sae.autoencoder import SAEWeights

NOT_RESID_POST = "is not resid_post; only residual-stream SAEs after a decoder layer are supported"


class SAELoadError(ValueError):
    """An SAE file or directory is missing, unsupported or inconsistent with the model."""


def subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir())


class SAEFormat(ABC):
    name: str  # what describe_format reports, e.g. "saelens"
    layout: str  # its files, for the error that lists the known layouts

    @abstractmethod
    def holds(self, d: Path) -> bool:
        """`d` itself holds SAEs of this format."""

    @abstractmethod
    def find_layers(self, root: Path) -> tuple[list[tuple[int, Path]], list[str]]:
        """Each (layer, file or directory) in `root`, and "name (reason)" for each SAE present
        but unusable."""

    @abstractmethod
    def looked_for(self, root: Path, layer: int) -> str:
        """Where `layer`'s SAE would be, for the error when it is missing."""

    def k(self, root: Path, name: str | None, k: int | None) -> int | None:
        """The TopK k given from outside the files (loading.qwen_scope_k); the formats whose
        config gives each SAE's own k take none, and refuse --sae-k."""
        if k is not None:
            raise SAELoadError(
                f"{root} ({self.name}): --sae-k applies only to Qwen-Scope layer{{n}}.sae.pt files; "
                "this format's cfg.json gives each SAE's k"
            )
        return None

    def load(self, root: Path, path: Path, layer: int, d_model: int, dtype: torch.dtype,
             device: torch.device | str, name: str | None, k: int | None) -> SAEWeights:
        """Layer `layer` from `path` (found by find_layers), checked against the model's
        hidden size, in dtype on device."""
        self.k(root, name, k)
        return self.read(path, layer, d_model, dtype, device)

    def read(self, path: Path, layer: int, d_model: int, dtype: torch.dtype,
             device: torch.device | str) -> SAEWeights:
        """`load` for a format whose files say everything (no name, no --sae-k)."""
        raise NotImplementedError


class LayerDirFormat(SAEFormat):
    """An SAE that is a directory (cfg.json + a weights file): `root` itself, or one
    subdirectory per layer."""

    label: str  # the format's short name in messages
    weights: str  # the weights file beside cfg.json

    def holds(self, d: Path) -> bool:
        return (d / "cfg.json").is_file() and (d / self.weights).is_file()

    @abstractmethod
    def layer_of(self, d: Path) -> tuple[int | None, str | None]:
        """(layer, None) for a usable SAE directory, else (None, why it cannot be used)."""

    def problem_at(self, d: Path) -> Path:
        """What an unusable single-directory SAE's error names."""
        return d / "cfg.json"

    def find_layers(self, root: Path) -> tuple[list[tuple[int, Path]], list[str]]:
        single = self.holds(root)
        found: list[tuple[int, Path]] = []
        ignored: list[str] = []
        for d in [root] if single else [s for s in subdirs(root) if self.holds(s)]:
            layer, problem = self.layer_of(d)
            if problem is not None:
                if single:
                    raise SAELoadError(f"{self.problem_at(d)}: {problem}")
                ignored.append(f"{d.name} ({problem})")
            else:
                assert layer is not None
                found.append((layer, d))
        return found, ignored
