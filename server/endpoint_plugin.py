"""vLLM endpoint plugin (`vllm.endpoint_plugins` entry point): routes, middleware, state.

vLLM builds its OpenAI app, then calls `attach_router` (routes, the authentication and
steering middleware) and, once the engine is up, `init_state`, where the workers are asked
which SAEs they loaded.
"""

from __future__ import annotations

import logging
from argparse import Namespace

from fastapi import FastAPI, Request
from starlette.datastructures import State
from starlette.exceptions import HTTPException

from steerserve_sae.protocol import rpc
from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_CONFIGS, DEFAULT_MAX_FEATURES, PluginConfig
from steerserve_sae.protocol.signing import SECRET_ENV, sign

from steerserve.middleware.auth import DEFAULT_OPEN_PATHS, AuthMiddleware, api_keys
from steerserve.batch import attach_batch_api, start_batch_service
from steerserve.steering.admission import ConfigAdmission
from steerserve.context import SteeringContext
from steerserve.engine_rpc import every_rank, per_engine
from steerserve.analysis.dashboard_store import DashboardIndex, DashboardStore
from steerserve.analysis.feature_labels import load_labels
from steerserve.routers.dashboards import router as dashboards_router
from steerserve.routers.features import router as features_router
from steerserve.errors import APIError
from steerserve.in_process import in_process_client, server_api_key
from steerserve.limits import Limits
from steerserve.routers.saes import router
from steerserve.middleware.steering import SteeringMiddleware
from steerserve.steering.worker_takes import WorkerTakes

ENDPOINT_PLUGIN_NAME = "steerserve_api"
logger = logging.getLogger("vllm.steerserve")


class SteerserveEndpointPlugin:
    name = ENDPOINT_PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        args = app.state.args  # vLLM sets it before calling endpoint plugins
        app.include_router(router)
        app.include_router(dashboards_router)
        app.include_router(features_router)
        app.add_middleware(SteeringMiddleware)
        # Added last, so it runs first: nothing is read before the key is checked.
        app.add_middleware(AuthMiddleware, keys=api_keys(args),
                           open_paths=tuple(getattr(args, "unauthenticated_paths", None) or DEFAULT_OPEN_PATHS))
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
            if not saes:  # never serve "steerable" requests that nothing would steer
                raise RuntimeError(
                    "steerserve: --sae was given but no worker installed SAE steering "
                    "(unsupported model runner? see the worker logs)"
                )
        context = SteeringContext(
            saes=saes,
            max_features=config.max_features if config else DEFAULT_MAX_FEATURES,
            sae_stages=stages,
            admission=ConfigAdmission(config.max_configs if config else DEFAULT_MAX_CONFIGS),
            engine=engine_client,
            takes=WorkerTakes(engine_client) if engine_client is not None else None,
            client=in_process_client(self._app, server_api_key(args)) if hasattr(self, "_app") else None,
            served_model=(getattr(args, "served_model_name", None) or [args.model])[0],
            max_model_len=engine_client.model_config.max_model_len if engine_client is not None else 0,
            limits=Limits.from_args(args),
        )
        if getattr(args, "feature_labels", None):
            context.labels = load_labels(args.feature_labels)
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


async def _check_workers_verify_signatures(engine_client) -> None:
    """A worker without the deployment's secret (e.g. a Ray node whose environment lacks it) would
    refuse every spec; each such request then fails with a 500 (steering_middleware.py). Say so
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
