"""Steering presets: named steering specs, each served as a model.

Most OpenAI clients (chat UIs, agent frameworks, IDE assistants) can only pick a `model`; a preset
lets them steer by picking one. Presets live in the data directory's SQLite (`presets.sqlite`),
so those created over HTTP survive a restart; `--steering-presets FILE` (YAML or JSON, name ->
spec) seeds them at start and wins over a stored preset of the same name. Every spec is checked
against the loaded SAEs exactly like an inline `steering` field, when it is stored and again at
start (a preset that no longer fits the loaded SAEs is refused at start-up, not at request time).
"""

from __future__ import annotations

import copy
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml

from steerserve_sae.protocol.spec import SteeringSpec

from steerserve.errors import APIError
from steerserve.steering.schema import parse_steering
from steerserve.steering import names
from steerserve.steering.vector_store import resolve_names

DB_NAME = "presets.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS presets (
    name        TEXT PRIMARY KEY,
    steering    TEXT NOT NULL,
    description TEXT,
    created_at  INTEGER NOT NULL,
    source      TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Preset:
    name: str
    steering: dict[str, Any]  # as the client gave it (validated); the spec id comes from its translation
    description: str | None
    created_at: int
    source: str  # "api" or the --steering-presets file it came from

    def card(self, parent: str, max_model_len: int) -> dict[str, Any]:
        """The preset's /v1/models entry, in the shape vLLM gives LoRA adapters."""
        return {"id": self.name, "object": "model", "created": self.created_at, "owned_by": "steerserve",
                "root": parent, "parent": parent, "max_model_len": max_model_len, "permission": [],
                "description": self.description}

    def public(self) -> dict[str, Any]:
        return {"object": "steering.preset", "name": self.name, "steering": self.steering,
                "description": self.description, "created_at": self.created_at, "source": self.source}


def check_name(name: object, param: str = "name") -> str:
    return names.check_name(name, "preset", param)


class PresetStore:
    """The presets, durable in SQLite. Every lookup reads the database (a primary-key read, a few
    microseconds), so API processes sharing a data dir (`--api-server-count`) see each other's
    changes; one connection per process behind a lock."""

    def __init__(self, data_dir: str | Path):
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path / DB_NAME, check_same_thread=False, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)

    def _rows(self, where: str = "", args: tuple = ()) -> list[Preset]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT name, steering, description, created_at, source FROM presets {where} ORDER BY name",
                args).fetchall()
        return [Preset(r[0], json.loads(r[1]), r[2], r[3], r[4]) for r in rows]

    def get(self, name: str) -> Preset | None:
        found = self._rows("WHERE name = ?", (name,))
        return found[0] if found else None

    def all(self) -> list[Preset]:
        return self._rows()

    def put(self, preset: Preset, *, replace: bool) -> bool:
        """Store a preset; False when the name is taken and `replace` is not set."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._lock:
            cursor = self._conn.execute(
                f"{verb} INTO presets (name, steering, description, created_at, source) VALUES (?, ?, ?, ?, ?)",
                (preset.name, json.dumps(preset.steering), preset.description, preset.created_at, preset.source))
            return bool(cursor.rowcount)

    def delete(self, name: str) -> bool:
        with self._lock:
            return bool(self._conn.execute("DELETE FROM presets WHERE name = ?", (name,)).rowcount)

    def close(self) -> None:
        self._conn.close()


def validate_spec(steering: object, context: Any) -> SteeringSpec:
    """A preset's spec, checked exactly like an inline `steering` field against the loaded SAEs and
    this server's limits (`context`: the SteeringContext). `compare` is a per-request choice, not
    part of a preset."""
    if isinstance(steering, dict) and "compare" in steering:
        raise APIError("a preset takes no `compare`: ask for it in the request that uses the preset",
                       param="steering.compare", code="invalid_steering")
    limits = context.limits
    steering = copy.deepcopy(steering)  # the preset keeps a stored vector's name, resolved per request
    resolve_names(steering, getattr(context, "vectors", None))
    spec, _ = parse_steering(steering, context.sae_sizes, context.max_features, limits.max_steering_value,
                             context.sae_stages, context.d_model, limits.max_steering_vectors,
                             getattr(context, "vector_layers", frozenset()))
    return spec


def resolve_model(payload: dict, store: PresetStore | None, served_model: str) -> tuple[dict, Preset | None]:
    """A request whose `model` names a preset: the served model instead, steered by the preset's
    spec. An inline `steering` adds its features and vectors to the preset's (listed first, so an
    error's JSON path points into what the client sent); the same feature in both, or another
    `apply_to`, is a 400 `preset_conflict`. Any other request is returned as it came."""
    name = payload.get("model")
    preset = store.get(name) if store is not None and isinstance(name, str) and name != served_model else None
    if preset is None:
        return payload, None
    inline = payload.get("steering")
    steering = dict(preset.steering)
    if isinstance(inline, dict):
        steering = _merge(inline, preset)
    elif inline is not None:  # not an object: refused by the inline field's own validation
        steering = inline
    return {**payload, "model": served_model, "steering": steering}, preset


def named_by_preset(additions: dict[str, Any], final: Callable[[], Awaitable[Any]] | None, name: str
                    ) -> tuple[dict[str, Any], Callable[[], Awaitable[Any]] | None]:
    """The response side of a preset request: its `model` is the preset's name (in the JSON body
    and every stream event that carries the echo) and its `steering` echo (also the end-of-response
    one, with a gated spec's counts) says `"preset": name` beside the spec id."""
    additions = {**additions, "model": name, "steering": {**additions["steering"], "preset": name}}
    if final is None:
        return additions, None

    async def named_final() -> Any:
        end = await final()
        if isinstance(end.fields.get("steering"), dict):
            end.fields["steering"]["preset"] = name
        return end

    return additions, named_final


def _merge(inline: dict, preset: Preset) -> dict:
    own = preset.steering
    apply_to = inline.get("apply_to", own.get("apply_to", "all"))
    if apply_to != own.get("apply_to", "all"):
        raise APIError(f"preset {preset.name!r} applies to {own.get('apply_to', 'all')!r}; an inline "
                       "`apply_to` cannot change it", param="steering.apply_to", code="preset_conflict")
    taken = [(f.get("layer"), f.get("index")) for f in own.get("features", [])]  # a list: inline values may be unhashable
    features = inline.get("features", [])
    for i, feature in enumerate(features if isinstance(features, list) else []):
        if isinstance(feature, dict) and (feature.get("layer"), feature.get("index")) in taken:
            raise APIError(f"feature {feature.get('index')} at layer {feature.get('layer')} is already steered by "
                           f"preset {preset.name!r}", param=f"steering.features[{i}]", code="preset_conflict")
    merged = {**own, **inline}
    for key in ("features", "vectors"):
        mine = inline.get(key, [])
        if isinstance(mine, list) and (mine or key in own):  # else the inline value stays (its validation says why)
            merged[key] = [*mine, *own.get(key, [])]
    return merged


def read_presets_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """`--steering-presets FILE`: name -> spec, or name -> {"steering": spec, "description": ...}."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML or JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of preset name -> steering spec")
    presets: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: preset {name!r} is not a mapping")
        presets[str(name)] = entry if "steering" in entry else {"steering": entry}
    return presets


def seed_from_file(store: PresetStore, path: str | Path, context: Any, served_models: set[str]) -> int:
    """Store every preset of the file (replacing stored ones of the same name); ValueError, naming
    the file and preset, for one that is malformed or does not fit the loaded SAEs."""
    entries = read_presets_file(path)
    for name, entry in entries.items():
        where = f"{path}: preset {name!r}"
        if not names.is_name(name):
            raise ValueError(f"{where}: a preset name is {names.NAME_RULE}")
        if name in served_models:
            raise ValueError(f"{where}: the name is a served model's")
        unknown = set(entry) - {"steering", "description"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected steering, description)")
        description = entry.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{where}: description must be a string")
        try:
            validate_spec(entry["steering"], context)
        except APIError as error:
            raise ValueError(f"{where}: {error.param}: {error.message}") from None
        store.put(Preset(name, entry["steering"], description, int(time.time()), str(path)), replace=True)
    return len(entries)
