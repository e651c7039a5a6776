"""Steering presets: named steering specs, each served as a model.

Most OpenAI clients (chat UIs, agent frameworks, IDE assistants) can only pick a `model`; a preset
lets them steer by picking one. Presets live in the data directory's SQLite (`presets.sqlite`),
or in the fleet's PostgreSQL with --database-url (steerserve/db), so those created over HTTP
survive a restart and every replica serves them; `--steering-presets FILE` (YAML or JSON, name ->
spec) seeds them at start and wins over a stored preset of the same name. Every spec is checked
against the loaded SAEs exactly like an inline `steering` field when it is stored, and every stored
preset again at start (PresetCheck): one that no longer fits the loaded SAEs, or whose name is now
a served model's or a LoRA adapter's, is logged and refused (not in /v1/models; a request naming
it is a 400 `preset_unusable` saying why). Presets are bounded like stored vectors (limits.py:
their count, description and spec size), so /v1/models, which every client calls, stays small.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml
from sqlalchemy import text

from steerserve_sae.protocol.spec import SteeringSpec

from steerserve.db import open_database
from steerserve.errors import APIError
from steerserve.steering.schema import parse_steering
from steerserve.steering import names
from steerserve.steering.vector_store import resolve_names



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

    def public(self, refusal: str | None) -> dict[str, Any]:
        """The API's view; `refusal`: why this server does not serve it (PresetCheck), None if it does."""
        return {"object": "steering.preset", "name": self.name, "steering": self.steering,
                "description": self.description, "created_at": self.created_at, "source": self.source,
                "status": "served" if refusal is None else "refused", "refused_because": refusal}


def check_name(name: object, param: str = "name") -> str:
    return names.check_name(name, "preset", param)


class PresetStore:
    """The presets, durable in the database (steerserve/db: SQLite in the data dir, or the fleet's
    PostgreSQL). No cache: every lookup reads the database (a primary-key read: microseconds on
    SQLite, a fraction of a millisecond to a PostgreSQL nearby), so API processes and replicas
    sharing it see a change as soon as the request that made it has answered."""

    def __init__(self, data_dir: str | Path, database_url: str | None = None):
        self._db = open_database("presets", data_dir, database_url)

    def _rows(self, where: str = "", args: dict | None = None) -> list[Preset]:
        rows = self._db.read(
            f"SELECT name, steering, description, created_at, source FROM presets {where} ORDER BY name", args)
        return [Preset(r[0], json.loads(r[1]), r[2], r[3], r[4]) for r in rows]

    def get(self, name: str) -> Preset | None:
        found = self._rows("WHERE name = :name", {"name": name})
        return found[0] if found else None

    def all(self) -> list[Preset]:
        return self._rows()

    def count(self) -> int:
        return self._db.read("SELECT COUNT(*) FROM presets")[0][0]

    def put(self, preset: Preset, *, replace: bool, max_count: int | None = None) -> bool:
        """Store a preset; False when the name is taken and `replace` is not set. With `max_count`,
        a 400 `too_many_presets` when that many are stored: counted inside the write transaction,
        which holds the presets' write lock, so processes and replicas cannot overshoot it together."""
        conflict = ("DO UPDATE SET steering = excluded.steering, description = excluded.description, "
                    "created_at = excluded.created_at, source = excluded.source") if replace else "DO NOTHING"
        with self._db.tx(serialize=True) as c:
            if max_count is not None:
                count = c.execute(text("SELECT COUNT(*) FROM presets")).scalar_one()
                taken = c.execute(text("SELECT 1 FROM presets WHERE name = :n"), {"n": preset.name}).first()
                if count >= max_count and taken is None:
                    raise too_many_presets(max_count, "name")
            cursor = c.execute(text(
                "INSERT INTO presets (name, steering, description, created_at, source) "
                f"VALUES (:name, :steering, :description, :created_at, :source) ON CONFLICT (name) {conflict}"),
                {"name": preset.name, "steering": spec_json(preset.steering), "description": preset.description,
                 "created_at": preset.created_at, "source": preset.source})
            return bool(cursor.rowcount)

    def delete(self, name: str) -> bool:
        with self._db.tx(serialize=True) as c:
            return bool(c.execute(text("DELETE FROM presets WHERE name = :n"), {"n": name}).rowcount)

    def close(self) -> None:
        self._db.close()


def preset_exists(name: str, param: str) -> APIError:
    return APIError(f"a steering preset named {name!r} exists; delete it first", param=param, code="preset_exists",
                    status=HTTPStatus.CONFLICT)


def too_many_presets(max_count: int, param: str) -> APIError:
    return APIError(f"this server stores at most {max_count} steering presets (--max-presets); delete one first",
                    param=param, code="too_many_presets")


def spec_json(steering: Any) -> str:
    """A spec as stored, and as its size limit counts it: compact JSON."""
    return json.dumps(steering, separators=(",", ":"))


def check_size(steering: Any, description: str | None, limits: Any) -> None:
    """The size limits of a preset (`limits`: the server's Limits), checked before anything else."""
    if description is not None and len(description) > limits.max_preset_description_chars:
        raise APIError(f"description is {len(description)} characters; this server takes at most "
                       f"{limits.max_preset_description_chars} (--max-preset-description-chars)",
                       param="description", code="description_too_long")
    size = len(spec_json(steering).encode())
    if size > limits.max_preset_spec_bytes:
        raise APIError(f"the steering spec is {size} bytes as JSON; a preset's takes at most "
                       f"{limits.max_preset_spec_bytes} (--max-preset-spec-bytes): name stored vectors "
                       "(/v1/steering/vectors) rather than inline them",
                       param="steering", code="preset_too_large")


class PresetCheck:
    """Whether this server serves a stored preset, and if not why. A preset was checked when it
    was stored, but perhaps by another server on the data dir or against SAEs since changed: each
    spec is checked here again, once (remembered by its JSON), and the name every time (a LoRA
    adapter may be loaded at run time). `context`: the SteeringContext."""

    def __init__(self, context: Any):
        self._context = context
        self._specs: dict[str, str | None] = {}

    def is_model(self, name: str) -> bool:
        """Whether a served model or LoRA adapter has this name: a request for it goes to that."""
        return name in self._context.model_names()

    def refusal(self, preset: Preset) -> str | None:
        """None when served; else why not, starting with the error code."""
        if self.is_model(preset.name):
            return f"model_name_taken: {preset.name!r} is the name of a served model or LoRA adapter"
        key = spec_json(preset.steering)
        if key not in self._specs:
            if len(self._specs) > 2 * self._context.limits.max_presets:  # specs of deleted presets
                self._specs.clear()
            try:
                validate_spec(preset.steering, self._context)
                self._specs[key] = None
            except APIError as error:
                self._specs[key] = f"{error.code}: {error.param}: {error.message}"
        return self._specs[key]

    def served(self, presets: list[Preset]) -> list[Preset]:
        return [p for p in presets if self.refusal(p) is None]


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


def named_preset(payload: dict, store: PresetStore | None, check: PresetCheck | None) -> Preset | None:
    """The preset a request's `model` names, if it names one this server serves; a 400
    `preset_unusable` saying why for one it refuses. A served model's or LoRA adapter's name is
    never a preset's."""
    name = payload.get("model")
    if store is None or check is None or not isinstance(name, str) or check.is_model(name):
        return None
    preset = store.get(name)
    refusal = None if preset is None else check.refusal(preset)
    if refusal is not None:
        raise APIError(f"steering preset {name!r} is not served here: {refusal}", param="model",
                       code="preset_unusable")
    return preset


def served_model_for(payload: dict, store: PresetStore | None, check: PresetCheck | None, served_model: str) -> dict:
    """A request to a route that takes a `model` but generates nothing (/v1/messages/count_tokens,
    /tokenize): a preset's name means the served model, as on every route."""
    if named_preset(payload, store, check) is None:
        return payload
    return {**payload, "model": served_model}


def resolve_model(payload: dict, store: PresetStore | None, check: PresetCheck | None, served_model: str
                  ) -> tuple[dict, Preset | None]:
    """A request whose `model` names a preset: the served model instead, steered by the preset's
    spec. An inline `steering` adds its features and vectors to the preset's (listed first, so an
    error's JSON path points into what the client sent); the same feature in both, or another
    `apply_to`, is a 400 `preset_conflict`. Any other request is returned as it came."""
    preset = named_preset(payload, store, check)
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


def seed_from_file(store: PresetStore, path: str | Path, context: Any) -> int:
    """Store every preset of the file (replacing stored ones of the same name); ValueError, naming
    the file and preset, for one that is malformed, too large, named like a served model or LoRA
    adapter, or does not fit the loaded SAEs."""
    entries = read_presets_file(path)
    for name, entry in entries.items():
        where = f"{path}: preset {name!r}"
        if not names.is_name(name):
            raise ValueError(f"{where}: a preset name is {names.NAME_RULE}")
        if name in context.model_names():
            raise ValueError(f"{where}: the name is a served model's or LoRA adapter's")
        unknown = set(entry) - {"steering", "description"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected steering, description)")
        description = entry.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{where}: description must be a string")
        try:
            check_size(entry["steering"], description, context.limits)
            validate_spec(entry["steering"], context)
        except APIError as error:
            raise ValueError(f"{where}: {error.param}: {error.message}") from None
        store.put(Preset(name, entry["steering"], description, int(time.time()), str(path)), replace=True)
    return len(entries)
