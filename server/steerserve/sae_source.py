"""Where `--sae` points: a local directory, or a Hugging Face Hub repo id resolved into the cache.

`--sae Qwen/SAE-Res-Qwen3.5-27B-W80K-L0_50[@revision]` downloads only the steered layers' files
(`layer{n}.sae.pt`, plus `config.json` if the repo has one) through huggingface_hub, which
honours HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE and shows its own progress bars: a whole 27B
release is 64 layers of 3.4 GB. It runs once, in the API process before the engine starts; the
workers get the snapshot directory and the repo's name, which the width and k are read from (a
snapshot directory is named after its commit).

Hub ids are for Qwen-Scope repos, whose layer files sit at the top level. SAELens and sparsify
repos keep each layer in a subfolder named after its hook, unknown before listing the repo; they
are refused with how to download one and pass the directory instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from steerserve_sae.sae.loading import sae_name_of

__all__ = ["SAESource", "SAESourceError", "resolve_sae_source"]

# owner/name[@revision]; huggingface_hub validates the repo id itself.
_HUB_ID = re.compile(r"(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>[^@\s]+))?")
_LAYER_FILE = re.compile(r"layer(\d+)\.sae\.pt")


class SAESourceError(ValueError):
    """`--sae` names neither a directory nor a usable hub repo (the message says what to do)."""


@dataclass(frozen=True)
class SAESource:
    path: str  # absolute local directory the workers load from
    name: str  # the name a Qwen-Scope set's width and k are read from
    repo_id: str | None = None  # set for a hub id
    revision: str | None = None  # the commit the hub id resolved to

    @property
    def hub_url(self) -> str | None:
        """`hf://owner/name@<commit>`: huggingface_hub's file-system path of the snapshot."""
        return f"hf://{self.repo_id}@{self.revision}" if self.repo_id else None


def resolve_sae_source(spec: str, layers: Iterable[int]) -> SAESource:
    """An existing path is a directory; else `owner/name[@revision]` is a hub repo, from which
    the files of `layers` are fetched (or found in the cache); anything else is an error."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SAESourceError(f"{spec} is a file; --sae takes an SAE directory or a hub repo id")
        local = os.path.abspath(path)
        return SAESource(local, sae_name_of(local))
    m = _HUB_ID.fullmatch(spec)
    if m is None:
        raise SAESourceError(
            f"{spec}: no such directory, and not a Hugging Face repo id (owner/name[@revision])"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(m["repo"])
    except HFValidationError as exc:
        raise SAESourceError(f"{spec}: no such directory, and not a valid hub repo id ({exc})") from None
    return _from_hub(m["repo"], m["revision"], sorted(set(layers)))


def _from_hub(repo_id: str, revision: str | None, layers: list[int]) -> SAESource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    files = [f"layer{n}.sae.pt" for n in layers]
    where = repo_id + (f"@{revision}" if revision else "")
    rev_option = f" --revision {revision}" if revision else ""
    fetch = f"`hf download {repo_id} {' '.join(files)}{rev_option}`"
    not_local = f" (and no local directory {repo_id} exists)"
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[*files, "config.json"])
    except RevisionNotFoundError:
        raise SAESourceError(
            f"{where}: the repo has no revision {revision!r}; give one of its branches, tags or commits"
        ) from None
    except RepositoryNotFoundError:
        raise SAESourceError(
            f"{repo_id}: no such hub repo, or it is private or gated and this token has no access "
            f"(set HF_TOKEN or run `hf auth login`){not_local}"
        ) from None
    except IncompleteSnapshotError as exc:
        raise SAESourceError(f"{where}: {exc} Or fetch the files with {fetch}.") from None
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            why = f"HF_HUB_OFFLINE is set: unset it, or fetch the files with {fetch} into the same HF_HUB_CACHE"
        else:
            why = f"the Hub cannot be reached ({exc.__cause__ or exc}); check the network or the proxy"
        cached_repo = Path(constants.HF_HUB_CACHE, _cache_folder(repo_id)).is_dir()
        what = f"revision {revision!r}" if revision and cached_repo else f"repo{not_local}"
        raise SAESourceError(
            f"{where}: the {what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}"
        ) from None
    except HfHubHTTPError as exc:
        raise SAESourceError(f"{where}: the Hub refused the download ({exc})") from None
    missing = [f for f in files if not (Path(snapshot) / f).is_file()]
    if missing:
        raise SAESourceError(_missing_files_message(repo_id, Path(snapshot), missing, fetch))
    return SAESource(snapshot, repo_id.split("/")[1], repo_id, Path(snapshot).name)


def _cache_folder(repo_id: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo_id, repo_type="model")


def _missing_files_message(repo_id: str, snapshot: Path, missing: list[str], fetch: str) -> str:
    """Which steered layers a snapshot lacks and why: the repo has no such file, the repo is
    not in the Qwen-Scope layout, or (offline, listing unknown) the file was never fetched."""
    from huggingface_hub import constants, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    where = f"{repo_id}@{snapshot.name}"
    try:
        listed = [f.path for f in get_cached_repo_tree(repo_id, revision=snapshot.name)]
    except CachedRepoTreeNotFoundError:
        listed = None
    if listed is None:  # a cache without the repo's listing: offline, or written by an old huggingface_hub
        why = "HF_HUB_OFFLINE is set: unset it, or fetch them" if constants.is_offline_mode() else "fetch them"
        return f"{where}: {', '.join(missing)} not in the cached snapshot {snapshot}; {why} with {fetch}"
    layers = sorted(int(m[1]) for f in listed if (m := _LAYER_FILE.fullmatch(f)))
    if not layers:
        return (f"{where} has no layer{{n}}.sae.pt at its top level: hub ids support Qwen-Scope repos only; "
                f"for a SAELens or sparsify repo run `hf download {repo_id} --local-dir DIR` and pass --sae DIR")
    offline = " (listing cached while HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
    return (f"{where} has no {', '.join(missing)}{offline}; its layers: {_ranges(layers)}; "
            "choose --sae-layers among them")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
