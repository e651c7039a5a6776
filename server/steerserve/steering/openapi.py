"""The `steering` and `trace` fields steerserve adds to vLLM's completion routes, in /openapi.json.

vLLM's request models do not know the fields: the steering middleware takes them out of the
body before vLLM validates it. So the generated document of each steerable route's body becomes
vLLM's model plus the two optional properties, described by the pydantic models that validate
them (schema.py, traces.py). Only those routes' bodies change: vLLM's models are shared with
routes that refuse the fields.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from steerserve.middleware.guard import STEERABLE_PATHS
from steerserve.steering.schema import Steering
from steerserve.steering.traces import TraceRequest

REF = "#/components/schemas/{model}"
FIELDS = {
    "steering": (Steering, "SAE feature edits applied while this request runs; the response echoes the normalised "
                           "spec (and, with compare, the unsteered answer)"),
    "trace": (TraceRequest, "each generated token's top SAE features at these layers, returned per choice"),
}


def describe_steering_fields(app: FastAPI) -> None:
    """Wraps `app.openapi` so the document it generates (once) carries the fields."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            add_steering_fields(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def add_steering_fields(document: dict[str, Any]) -> None:
    _, definitions = models_json_schema([(model, "validation") for model, _ in FIELDS.values()], ref_template=REF)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    properties = {name: {"anyOf": [{"$ref": REF.format(model=model.__name__)}, {"type": "null"}],
                         "description": description} for name, (model, description) in FIELDS.items()}
    for path in STEERABLE_PATHS:
        body = document.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {})
        content = body.get("content", {}).get("application/json")
        if content is not None and "schema" in content:
            content["schema"] = {"allOf": [content["schema"], {"type": "object", "properties": properties}]}
