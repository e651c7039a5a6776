"""Stored direction vectors: named vectors a steering spec can use by name.

A client uploads a vector once (base64, a .safetensors / .pt / .npy file or a GGUF control
vector) and then steers with `"vector": "<name>"`. A name holds either one vector for any layer
or, for a control vector, one per layer. Rows live in the data directory's SQLite
(`vectors.sqlite`), or in the fleet's PostgreSQL with --database-url (steerserve/db), so they
survive a restart and every API process and replica sharing the database sees the same vectors; a steered request that names one reads its rows (a primary-key read). Each
vector is checked when stored: d_model finite float32 values with a finite float32 norm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from steerserve_sae.protocol.spec import VECTOR_NOT_FINITE, encode_vector, finite_vector

from steerserve.db import open_database
from steerserve.errors import APIError
from steerserve.steering import names

ANY = -1  # the layer column of a vector stored for any layer


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
    if not finite_vector(values):
        raise APIError(VECTOR_NOT_FINITE, param=param, code="invalid_vector")
    return np.ascontiguousarray(values, dtype="<f4")


def vector_exists(name: str, why: str = "delete it first", param: str = "name") -> APIError:
    return APIError(f"a vector named {name!r} exists; {why}", param=param, code="vector_exists",
                    status=HTTPStatus.CONFLICT)


class VectorStore:
    """The stored vectors, durable in the database (steerserve/db): the one truth for every API
    process and replica sharing it and every model sharing it (rows of another d_model are not
    served, but their names stay taken and their rows count). No cache: every lookup reads the
    database (a primary-key range read of one name's rows), as PresetStore does, so no process
    serves a stale copy; a store checks the name and the row limit inside its write transaction,
    which holds the vectors' write lock, so two processes cannot both take a name or the last rows."""

    def __init__(self, data_dir: str | Path, d_model: int, max_rows: int, database_url: str | None = None):
        self.d_model, self.max_rows = d_model, max_rows
        self._db = open_database("vectors", data_dir, database_url)

    def _read(self, where: str = "", params: dict | None = None) -> dict[str, StoredVector]:
        """This model's vectors among the rows `where` selects."""
        found: dict[str, StoredVector] = {}
        for name, layer, data, description, created_at, source in self._db.read(
                f"SELECT name, layer, data, description, created_at, source FROM vectors "
                f"WHERE length(data) = :size {where} ORDER BY name, layer", {"size": 4 * self.d_model, **(params or {})}):
            known = found.setdefault(name, StoredVector(name, {}, description, created_at, source))
            known.layers[None if layer == ANY else layer] = np.frombuffer(bytes(data), dtype="<f4").astype(np.float32)
        return found

    def get(self, name: str) -> StoredVector | None:
        return self._read("AND name = :name", {"name": name}).get(name)

    def all(self) -> list[StoredVector]:
        return list(self._read().values())

    def put(self, vector: StoredVector) -> None:
        """Store a new name; 409 when it is taken (by any model), 400 past the store's size."""
        try:
            with self._db.tx(serialize=True) as c:  # the write lock: no other writer commits until we do
                self._insert(c, vector)
        except IntegrityError:
            raise vector_exists(vector.name) from None

    def _insert(self, c: Connection, vector: StoredVector) -> None:
        taken = c.execute(text("SELECT length(data) FROM vectors WHERE name = :n LIMIT 1"), {"n": vector.name}).first()
        if taken is not None and taken[0] == 4 * self.d_model:
            raise vector_exists(vector.name)
        if taken is not None:
            raise vector_exists(vector.name, f"it is stored for another model sharing this data dir (d_model "
                                       f"{taken[0] // 4})")
        rows = c.execute(text("SELECT COUNT(*) FROM vectors")).scalar_one()
        if rows + len(vector.layers) > self.max_rows:
            raise APIError(f"this server stores at most {self.max_rows} vectors (one per layer of a control vector, "
                           f"every model's sharing the data dir; --max-stored-vectors); {rows} are stored",
                           param="name", code="too_many_stored_vectors")
        c.execute(text(
            "INSERT INTO vectors (name, layer, data, description, created_at, source) "
            "VALUES (:name, :layer, :data, :description, :created_at, :source)"),
            [{"name": vector.name, "layer": ANY if layer is None else layer, "data": values.astype("<f4").tobytes(),
              "description": vector.description, "created_at": vector.created_at, "source": vector.source}
             for layer, values in vector.layers.items()])

    def delete(self, name: str) -> bool:
        """Whether this call deleted the name's rows (False when another got there first)."""
        with self._db.tx(serialize=True) as c:
            return bool(c.execute(text("DELETE FROM vectors WHERE name = :n AND length(data) = :size"),
                                  {"n": name, "size": 4 * self.d_model}).rowcount)

    def close(self) -> None:
        self._db.close()


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
