"""Stored direction vectors: named vectors a steering spec can use by name.

A client uploads a vector once (base64, a .safetensors / .pt / .npy file or a GGUF control
vector) and then steers with `"vector": "<name>"`. A name holds either one vector for any layer
or, for a control vector, one per layer. Rows live in the data directory's SQLite
(`vectors.sqlite`), so they survive a restart; reads come from memory, as every steered request
may resolve names. Each vector is checked when stored: d_model finite float32 values.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from steerserve_sae.protocol.spec import encode_vector

from steerserve.errors import APIError
from steerserve.steering import names

DB_NAME = "vectors.sqlite"
ANY = -1  # the layer column of a vector stored for any layer
SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    name        TEXT NOT NULL,
    layer       INTEGER NOT NULL,
    data        BLOB NOT NULL,
    description TEXT,
    created_at  INTEGER NOT NULL,
    source      TEXT NOT NULL,
    PRIMARY KEY (name, layer)
);
"""


@dataclass(frozen=True)
class StoredVector:
    name: str
    layers: dict[int | None, np.ndarray]  # None: for any layer
    description: str | None
    created_at: int
    source: str  # "base64", or the uploaded file's format

    def public(self, with_data: bool = False) -> dict[str, Any]:
        """The API object; the list leaves out the values (d_model floats per layer)."""
        entries = []
        for layer in sorted(self.layers, key=lambda l: -1 if l is None else l):
            values = self.layers[layer]
            entry = {"layer": layer, "norm": float(np.linalg.norm(values.astype(np.float64)))}
            if with_data:
                entry["vector"] = encode_vector(values)
            entries.append(entry)
        return {"object": "steering.vector", "name": self.name, "d_model": int(next(iter(self.layers.values())).size),
                "layers": entries, "description": self.description, "created_at": self.created_at,
                "source": self.source}


def check_name(name: object, param: str = "name") -> str:
    return names.check_name(name, "vector", param)


def check_values(values: np.ndarray, d_model: int, param: str) -> np.ndarray:
    if values.size != d_model:
        raise APIError(f"the vector has {values.size} values; the residual stream has {d_model} (d_model)",
                       param=param, code="invalid_vector")
    if not np.isfinite(values).all():
        raise APIError("vector components must be finite (no NaN or infinity)", param=param, code="invalid_vector")
    return np.ascontiguousarray(values, dtype="<f4")


class VectorStore:
    """The stored vectors, durable in SQLite; one connection behind a lock (every call is short)."""

    def __init__(self, data_dir: str | Path, d_model: int, max_rows: int):
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.d_model, self.max_rows = d_model, max_rows
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path / DB_NAME, check_same_thread=False, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        self._cache: dict[str, StoredVector] = {}
        for name, layer, data, description, created_at, source in self._conn.execute(
                "SELECT name, layer, data, description, created_at, source FROM vectors"):
            values = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if values.size != d_model:  # stored for another model: kept on disk, not served
                continue
            known = self._cache.get(name) or StoredVector(name, {}, description, created_at, source)
            known.layers[None if layer == ANY else layer] = values
            self._cache[name] = known

    def get(self, name: str) -> StoredVector | None:
        return self._cache.get(name)

    def all(self) -> list[StoredVector]:
        return sorted(self._cache.values(), key=lambda v: v.name)

    def rows(self) -> int:
        return sum(len(v.layers) for v in self._cache.values())

    def put(self, vector: StoredVector) -> None:
        """Store a new name; 409 when it is taken, 400 past the store's size."""
        with self._lock:
            if vector.name in self._cache:
                raise APIError(f"a vector named {vector.name!r} exists; delete it first", param="name",
                               code="vector_exists", status=HTTPStatus.CONFLICT)
            if self.rows() + len(vector.layers) > self.max_rows:
                raise APIError(f"this server stores at most {self.max_rows} vectors (one per layer of a control "
                               f"vector; --max-stored-vectors); {self.rows()} are stored", param="name",
                               code="too_many_stored_vectors")
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO vectors (name, layer, data, description, created_at, source) VALUES (?, ?, ?, ?, ?, ?)",
                    [(vector.name, ANY if layer is None else layer, values.astype("<f4").tobytes(), vector.description,
                      vector.created_at, vector.source) for layer, values in vector.layers.items()])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._cache[vector.name] = vector

    def delete(self, name: str) -> bool:
        with self._lock:
            deleted = self._conn.execute("DELETE FROM vectors WHERE name = ?", (name,)).rowcount
            self._cache.pop(name, None)
            return bool(deleted)

    def close(self) -> None:
        self._conn.close()


def new_vector(name: str, layers: dict[int | None, np.ndarray], description: str | None, source: str,
               d_model: int) -> StoredVector:
    """A vector to store, every layer's values checked."""
    checked = {}
    for layer, values in layers.items():
        if layer is not None and not 0 <= layer < 4096:
            raise APIError(f"layer {layer} is not a layer number", param="layer", code="invalid_layer")
        checked[layer] = check_values(values, d_model, "vector" if source == "base64" else "file")
    return StoredVector(check_name(name), checked, description, int(time.time()), source)


def resolve_names(steering: object, store: VectorStore | None) -> dict[tuple[int, str], str]:
    """Replace each `steering.vectors[i].vector` that names a stored vector by its base64 (the
    stored vector of that layer, or the one for any layer), so the spec is validated, identified
    and applied exactly as the same vector given inline. Anything else is left to the schema.
    Returns (layer, base64) -> name of what was replaced, for the echo to name the vectors."""
    replaced: dict[tuple[int, str], str] = {}
    if store is None or not isinstance(steering, dict) or not isinstance(steering.get("vectors"), list):
        return replaced
    for i, entry in enumerate(steering["vectors"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("vector"), str):
            continue
        name = entry["vector"]
        stored = store.get(name) if names.is_name(name) else None
        if stored is None:
            if names.is_name(name) and len(name) < 4 * ((4 * store.d_model + 2) // 3):
                raise APIError(f"no stored vector is named {name!r} (and it is too short to be an inline "
                               f"base64 vector)", param=f"steering.vectors[{i}].vector", code="vector_not_found")
            continue
        layer = entry.get("layer")
        values = stored.layers.get(layer) if isinstance(layer, int) and not isinstance(layer, bool) else None
        values = values if values is not None else stored.layers.get(None)
        if values is None:
            raise APIError(f"stored vector {name!r} has no direction for layer {layer!r} (it has layers "
                           f"{sorted(l for l in stored.layers if l is not None)})",
                           param=f"steering.vectors[{i}].layer", code="vector_layer_missing")
        encoded = encode_vector(values)
        steering["vectors"] = [*steering["vectors"][:i], {**entry, "vector": encoded}, *steering["vectors"][i + 1:]]
        replaced[(layer, encoded)] = name
    return replaced
