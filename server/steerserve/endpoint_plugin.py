"""vLLM endpoint plugin (`vllm.endpoint_plugins` entry point): routes, middleware, state.

vLLM builds its OpenAI app, then calls `attach_router` (routes, the authentication and
steering middleware) and, once the engine is up, `init_state`, where the workers are asked
which SAEs they loaded.
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace

from fastapi import FastAPI, Request
from starlette.datastructures import State
from starlette.exceptions import HTTPException

from steerserve_sae.protocol import rpc
from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_CONFIGS, DEFAULT_MAX_FEATURES, PluginConfig
from steerserve_sae.protocol.signing import SECRET_ENV, sign

from steerserve.middleware.auth import DEFAULT_OPEN_PATHS, AuthMiddleware, api_keys
from steerserve.batch import attach_batch_api, start_batch_service
from steerserve.batch.plugin import DEFAULT_DATA_DIR
from steerserve.steering.admission import ConfigAdmission
from steerserve.context import SteeringContext
from steerserve.engine_rpc import every_rank, per_engine
from steerserve.analysis.dashboard_store import DashboardIndex, DashboardStore
from steerserve.analysis.feature_labels import load_labels
from steerserve.routers.dashboards import router as dashboards_router
from steerserve.routers.features import router as features_router
from steerserve.routers.contrast import router as contrast_router
from steerserve.routers.vectors import router as vectors_router
from steerserve.routers.presets import router as presets_router
from steerserve.errors import APIError, answer_api_errors
from steerserve.in_process import in_process_client, server_api_key
from steerserve.limits import Limits
from steerserve.playground import PLAYGROUND_PATHS, router as playground_router
from steerserve.routers.saes import router
from steerserve.middleware.steering import SteeringMiddleware
from steerserve.steering.openapi import describe_steering_fields
from steerserve.steering.presets import PresetCheck, PresetStore, seed_from_file
from steerserve.steering.vector_store import VectorStore
from steerserve.steering.worker_takes import WorkerTakes

ENDPOINT_PLUGIN_NAME = "steerserve_api"
logger = logging.getLogger("vllm.steerserve")


class SteerserveEndpointPlugin:
    name = ENDPOINT_PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        args = app.state.args  # vLLM sets it before calling endpoint plugins
        answer_api_errors(app)
        app.include_router(router)
        app.include_router(dashboards_router)
        app.include_router(features_router)
        app.include_router(vectors_router)
        app.include_router(contrast_router)
        app.include_router(presets_router)
        describe_steering_fields(app)
        app.include_router(playground_router)  # /ui: static files that call the API with the user's key
        app.add_middleware(SteeringMiddleware)
        # Added last, so it runs first: nothing is read before the key is checked.
        open_paths = tuple(getattr(args, "unauthenticated_paths", None) or DEFAULT_OPEN_PATHS) + PLAYGROUND_PATHS
        app.add_middleware(AuthMiddleware, keys=api_keys(args), open_paths=open_paths)
        attach_batch_api(app)  # /v1/files, /v1/batches
        self._app = app  # batch lines are sent through this app in-process
        # Unknown routes and methods answer in the OpenAI error shape like everything else
        # (vLLM's handler covers FastAPI's HTTPException, not the router's own).
        app.add_exception_handler(HTTPException, _http_error)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        config = PluginConfig.from_additional_config(getattr(args, "additional_config", None))
        saes: list[rpc.SAEInfo] = []
        stages: tuple[frozenset[int], ...] = ()
        if config is not None and engine_client is not None:
            saes, stages = rpc.merge_sae_info(await every_rank(engine_client, rpc.SAE_INFO))
            if config.vector_only_layers:
                stages = await _steered_stages(engine_client, config)
            if (config.sae_layers and not saes) or not stages:  # never admit what nothing would steer
                raise RuntimeError(
                    "steerserve: --sae or --steering-layers was given but no worker installed steering "
                    "(unsupported model runner? see the worker logs)"
                )
        context = SteeringContext(
            saes=saes,
            max_features=config.max_features if config else DEFAULT_MAX_FEATURES,
            sae_stages=stages,
            vector_layers=frozenset(config.vector_only_layers) if config else frozenset(),
            hidden_size=engine_client.model_config.get_hidden_size() if engine_client is not None else 0,
            admission=ConfigAdmission(config.max_configs if config else DEFAULT_MAX_CONFIGS),
            engine=engine_client,
            takes=WorkerTakes(engine_client) if engine_client is not None else None,
            client=in_process_client(self._app, server_api_key(args)) if hasattr(self, "_app") else None,
            served_model=(getattr(args, "served_model_name", None) or [args.model])[0],
            served_models=tuple(getattr(args, "served_model_name", None) or [args.model]),
            adapters=_lora_adapters(state),
            max_model_len=engine_client.model_config.max_model_len if engine_client is not None else 0,
            limits=Limits.from_args(args),
        )
        if getattr(args, "feature_labels", None):
            context.labels = load_labels(args.feature_labels)
        context.vectors = _open_vectors(context, args)
        _open_presets(context, args)
        if getattr(args, "feature_dashboards", None):
            context.dashboards = DashboardIndex(DashboardStore(args.feature_dashboards, readonly=True))
        if config is not None and engine_client is not None:

            async def worker_stats() -> dict:
                return rpc.merge_stats([ranks[0] for ranks in await per_engine(engine_client, rpc.STATS)])

            context.metrics.bind(worker_stats, context.admission, context.takes)
            await _check_workers_verify_signatures(engine_client)
            await context.metrics.refresh()
        state.steerserve = context
        if engine_client is not None and getattr(self, "_app", None) is not None:
            start_batch_service(self._app, engine_client, state, args)


async def _steered_stages(engine_client, config: PluginConfig) -> tuple[frozenset[int], ...]:
    """The layer set each worker steers, SAE layers and vector-only layers alike (a gate must be
    on its edit's pipeline stage, whichever kind of layer the edit is at)."""
    per_rank = await every_rank(engine_client, rpc.STATS)
    return tuple({frozenset([*s.get("sae_layers", ()), *s.get("vector_layers", ())]) for s in per_rank if s})


def _lora_adapters(state: State):
    """The names of the LoRA adapters vLLM serves now: --lora-modules and any loaded at run time
    (its model registry, built before endpoint plugins' state)."""
    models = getattr(state, "openai_serving_models", None)
    return lambda: tuple(getattr(models, "lora_requests", None) or ())


def _open_presets(context: SteeringContext, args: Namespace) -> None:
    """The data dir's presets, seeded from --steering-presets; a preset of that file that does not
    fit the loaded SAEs stops the start-up (the message names the file and the preset). Every
    stored preset is checked again: those this server cannot serve are logged with the reason."""
    context.presets = PresetStore(os.path.abspath(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR),
                                  getattr(args, "database_url", None))
    context.preset_check = PresetCheck(context)
    path = getattr(args, "steering_presets", None)
    if path:
        try:
            count = seed_from_file(context.presets, path, context)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"steerserve: --steering-presets {exc}") from None
        logger.info("steerserve: %d steering presets from %s", count, path)
    stored = context.presets.all()
    for preset in stored:
        refusal = context.preset_check.refusal(preset)
        if refusal is not None:
            logger.warning("steerserve: steering preset %r (%s) is not served: %s", preset.name, preset.source, refusal)
    served = len(context.preset_check.served(stored))
    logger.info("steerserve: serving %d of %d stored steering presets", served, len(stored))


def _open_vectors(context: SteeringContext, args: Namespace) -> VectorStore | None:
    """The data dir's stored vectors, for this model's residual width."""
    d_model = context.d_model
    if not d_model:
        return None
    data_dir = os.path.abspath(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR)
    return VectorStore(data_dir, d_model, context.limits.max_stored_vectors, getattr(args, "database_url", None))


async def _check_workers_verify_signatures(engine_client) -> None:
    """A worker without the deployment's secret (e.g. a Ray node whose environment lacks it) would
    refuse every spec; each such request then fails with a 500 (middleware/response_end.py). Say so
    once, loudly, at start-up, naming the workers."""
    replies = await per_engine(engine_client, rpc.VERIFY_SIGNATURE, (sign("steerserve-start-up-check"),))
    refusing = [f"engine {e} rank {r}: {why}" for e, ranks in enumerate(replies) for r, why in enumerate(ranks) if why]
    if refusing:
        logger.error("steerserve: workers cannot verify the API's signatures (%s): every steered or traced request "
                     "will fail with a 500 until every vLLM process is started with the same %s",
                     "; ".join(refusing), SECRET_ENV)


async def _http_error(request: Request, exc: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(message, code=code, status=exc.status_code).response()
