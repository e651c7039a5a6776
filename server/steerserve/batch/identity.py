"""Which server a batch belongs to, and which server's runner holds a data dir.

Two servers started from one checkout share `.state/data` unless told otherwise, and the
served name alone does not tell them apart (configs/default.yaml names every model
`fortunes-qwen3.5`). A batch is therefore stamped at creation with the identity of the server
that accepted it (the model, how it is served and the SAEs that steer it), and a runner claims
only batches of its own identity. The runner's lock file (flock) names the identity of the
server holding it, so a second server of another identity on the same data dir is refused
before it accepts batches no runner of its own would ever run. API processes of one server
(--api-server-count) share the identity and the data dir, as they must.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerserve_sae.protocol.plugin_config import ADDITIONAL_CONFIG_KEY

LOCK_NAME = "runner.lock"
HOLDER_WRITE_WAIT = 1.0  # seconds a new holder may take to write its identity after locking
# The plugin options that decide what a batch line's answer is (limits and kernels do not).
_STEERING_KEYS = ("sae_path", "sae_layers", "steering_layers", "sae_name", "sae_k", "sae_hub_url")


@dataclass(frozen=True)
class ServerIdentity:
    key: str  # a digest of `description`: what batches are stamped with
    description: str  # what the logs and refusals say

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "description": self.description, "pid": os.getpid()})


class DataDirInUse(RuntimeError):
    """Another server's runner holds the data dir."""


def _path_or_name(value: Any) -> str | None:
    """A local path made absolute (two checkouts' `models/x` differ), anything else as given."""
    if value is None:
        return None
    text = str(value)
    return os.path.realpath(text) if os.path.exists(text) else text


def server_identity(args: Namespace) -> ServerIdentity:
    """The identity of the server `args` configure: model, served names, dtype and steering."""
    model = getattr(args, "model_tag", None) or getattr(args, "model", None)
    steering = (getattr(args, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY) or {}
    parts = {
        "model": _path_or_name(model),
        "served_as": list(getattr(args, "served_model_name", None) or []),
        "dtype": str(getattr(args, "dtype", None)),
        "steering": {k: steering.get(k) for k in _STEERING_KEYS if steering.get(k) not in (None, "", [])},
    }
    if "sae_path" in parts["steering"]:
        parts["steering"]["sae_path"] = _path_or_name(parts["steering"]["sae_path"])
    text = json.dumps(parts, sort_keys=True)
    served = ", ".join(parts["served_as"]) or parts["model"]
    sae = parts["steering"].get("sae_path") or "no SAE"
    return ServerIdentity(hashlib.sha256(text.encode()).hexdigest()[:16],
                          f"model {parts['model']} served as {served} ({sae}, dtype {parts['dtype']})")


class RunnerLock:
    """The data dir's runner lock: at most one process runs its batches, and the lock file
    says whose identity that process has."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, identity: ServerIdentity) -> bool:
        """True when this process now holds the lock (and the file names `identity`)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, identity.to_json().encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says of its holder ({} when it says nothing readable)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def refuse_other_holder(self, identity: ServerIdentity) -> None:
        """DataDirInUse when a live runner of another identity holds the lock: a second server
        of another model would accept batches that only the holder's runner could ever claim.
        A holder writes its identity just after locking, so what the file says is read again
        for HOLDER_WRITE_WAIT seconds before it is believed (the previous holder's, or nothing)."""
        deadline = time.monotonic() + HOLDER_WRITE_WAIT
        while True:
            if not self.path.exists() or self._free():
                return
            holder = self.holder() or {}
            if holder.get("key") == identity.key:
                return  # another API process of this server, or a replica of the same server
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise DataDirInUse(
            f"--data-dir {self.path.parent} is in use by another steerserve server "
            f"({holder.get('description', 'unknown identity')}, pid {holder.get('pid', '?')}), whose batch runner "
            f"holds {self.path}; this server ({identity.description}) would accept batches only that one could "
            "run: give it a --data-dir of its own")

    def _free(self) -> bool:
        """True when nobody holds the lock now (taken and released at once)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
