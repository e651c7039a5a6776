"""`steerserve serve`: vLLM's own serve, plus the SAE options.

It reuses vLLM's serve parser, so every engine argument and `--config FILE.yaml` (keys are long
option names; command-line flags override the file) work exactly as in `vllm serve`. The SAE
options are packed into vLLM's `additional_config`, which reaches every worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from steerserve.cli.engine_checks import (
    choose_model_runner, explain_tensor_parallel_fusion, is_cpu_build, keep_steering_out_of_cuda_graphs,
    preflight_local_model, refuse_frontends_without_the_app, refuse_model_runner_overrides,
    refuse_unverified_row_layouts,
)

GENERAL_PLUGIN_NAME = "steerserve_sae"


def _layer_list(values: list[str], option: str = "--sae-layers") -> list[int]:
    layers = []
    for value in values:
        for part in str(value).replace(",", " ").split():
            try:
                layers.append(int(part))
            except ValueError:
                sys.exit(f"error: {option}: {part!r} is not a layer number")
    return layers


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def add_steering_args(parser: argparse.ArgumentParser) -> None:
    from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_CONFIGS, DEFAULT_MAX_FEATURES, DEFAULT_MAX_STORE_MIB, \
        STEERING_KERNELS
    from steerserve.middleware.auth import DEFAULT_OPEN_PATHS
    from steerserve.batch.plugin import DEFAULT_BATCH_CONCURRENCY, DEFAULT_DATA_DIR
    from steerserve.limits import Limits

    group = parser.add_argument_group("steerserve", "SAE steering")
    group.add_argument("--sae", default=None, metavar="DIR_OR_HUB_ID",
                       help="SAE directory (Qwen-Scope, SAELens or sparsify layout), or a Qwen-Scope hub repo "
                            "id owner/name[@revision] (only the --sae-layers files are downloaded) (default: none, "
                            "no SAE features)")
    group.add_argument("--sae-layers", nargs="+", default=None, metavar="LAYERS",
                       help="decoder layers to steer, e.g. 8,16,32 (required with --sae; default: none)")
    group.add_argument("--steering-layers", nargs="+", default=None, metavar="LAYERS",
                       help="decoder layers where direction vectors steer, also without an SAE there (and "
                            "without --sae at all), e.g. 4,12 (default: none, vectors only at the SAE layers)")
    group.add_argument("--sae-k", type=_positive_int, default=None, metavar="K",
                       help="TopK k of Qwen-Scope files whose directory is not named SAE-Res-...-L0_{k} "
                            "and has no config.json (must agree with either when given) (default: from them)")
    group.add_argument("--max-steering-features", type=int, default=DEFAULT_MAX_FEATURES, metavar="N",
                       help="most features one request may steer")
    group.add_argument("--max-steering-configs", type=int, default=DEFAULT_MAX_CONFIGS, metavar="N",
                       help="distinct steering specs in flight; more wait for a free slot")
    group.add_argument("--max-worker-store-mib", type=_positive_int, default=DEFAULT_MAX_STORE_MIB, metavar="MIB",
                       help="host memory per worker for results kept until the API takes them (inspect captures, "
                            "traces, gate reports); a request whose results would not fit gets a 503")
    group.add_argument("--steering-kernel", choices=STEERING_KERNELS, default="auto",
                       help="steering op: on CPU the native kernel (built once with the C++ compiler), the "
                            "PyTorch op, or auto (native when it builds); on GPU the PyTorch op, or triton "
                            "(experimental capture-safe kernels, not yet validated on a GPU)")
    group.add_argument("--feature-labels", default=None, metavar="FILE",
                       help="JSONL of {layer, index, label, description?} shown by the features API (default: "
                            "none, features unlabelled)")
    group.add_argument("--feature-dashboards", default=None, metavar="FILE",
                       help="SQLite file from `steerserve dashboards`: histograms and top examples in the features "
                            "API (default: none)")
    group.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                       help="where the Files/Batches API and the steering presets keep their SQLite databases "
                            "and file contents")
    group.add_argument("--database-url", default=None, metavar="URL",
                       help="postgresql://user:password@host:port/database: keep presets, stored vectors, files and "
                            "batches there instead of SQLite in --data-dir, shared by every replica of a fleet "
                            "(docs/fleet.md); the schema is created or upgraded at start (default: none, SQLite in --data-dir)")
    group.add_argument("--batch-lease-seconds", type=float, default=None, metavar="S",
                       help="how long a runner's claim on a batch line lasts without renewal (renewed every third "
                            "of it): how soon another replica takes over the lines of one that died (default: 30)")
    group.add_argument("--steering-presets", default=None, metavar="FILE",
                       help="YAML or JSON mapping preset name -> steering spec (or {steering, description}); each "
                            "is served as a model and stored in --data-dir, replacing a stored one of that name "
                            "(default: none)")
    group.add_argument("--batch-concurrency", type=int, default=DEFAULT_BATCH_CONCURRENCY, metavar="N",
                       help="batch lines in flight at once (they run at lower priority than interactive requests)")
    group.add_argument("--unauthenticated-paths", nargs="*", default=list(DEFAULT_OPEN_PATHS), metavar="PATH",
                       help="with --api-key, the exact paths that answer without a key (default: %(default)s); "
                            "every other path of every route needs it, /metrics included")
    Limits.add_arguments(parser.add_argument_group("steerserve limits", "request limits (server/steerserve/limits.py)"))


def _enable_plugins() -> None:
    """vLLM loads endpoint plugins only when VLLM_PLUGINS names them; keep other plugins on."""
    from steerserve.endpoint_plugin import ENDPOINT_PLUGIN_NAME

    ours = [GENERAL_PLUGIN_NAME, ENDPOINT_PLUGIN_NAME]
    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    else:
        names = [n for n in current.split(",") if n]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(names + ours))


def _copy_to_ray_workers(*names: str) -> None:
    """Local processes inherit the environment; vLLM's Ray workers (other nodes) get only the
    variables it copies, which this list extends."""
    key = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
    current = [n for n in os.environ.get(key, "").split(",") if n]
    os.environ[key] = ",".join(dict.fromkeys([*current, *names]))


def prepare_worker_environment() -> None:
    """What every vLLM process must inherit, set before the first one starts: the plugins
    enabled, the plugin's activation, and the deployment's signing secret, also for the Ray
    workers and engine actors of other nodes (tests/test_vllm_compat.py reads vLLM's own
    choice of the variables it copies)."""
    from steerserve_sae import ACTIVATION_ENV
    from steerserve_sae.protocol.signing import SECRET_ENV, ensure_deployment_secret

    _enable_plugins()
    os.environ[ACTIVATION_ENV] = "1"  # vLLM's processes inherit it: the plugin patches only these
    ensure_deployment_secret()
    _copy_to_ray_workers(ACTIVATION_ENV, SECRET_ENV)


def _take_api_keys(args: argparse.Namespace) -> None:
    """steerserve checks the keys on every path (server/steerserve/middleware/auth.py); vLLM's own check covers only
    /v1 and a few prefixes and answers in another shape, so vLLM is not given them."""
    from steerserve.middleware.auth import KEYS_ATTRIBUTE, api_keys

    setattr(args, KEYS_ATTRIBUTE, api_keys(args))
    args.api_key = None
    os.environ.pop("VLLM_API_KEY", None)


def configure_steering(args: argparse.Namespace) -> None:
    """Validate the SAE and steering-layer options early (before the engine starts) and hand them
    to vLLM."""
    from steerserve_sae.protocol.plugin_config import ADDITIONAL_CONFIG_KEY, PluginConfig
    from steerserve_sae.vllm_hooks.worker_extension import WORKER_EXTENSION_CLS

    prepare_worker_environment()
    _take_api_keys(args)
    if args.feature_labels:
        from steerserve.analysis.feature_labels import LabelsFileError, load_labels

        try:
            load_labels(args.feature_labels)
        except LabelsFileError as exc:
            sys.exit(f"error: --feature-labels: {exc}")
    if args.steering_presets:  # its specs are checked against the SAEs once the workers loaded them
        from steerserve.steering.presets import read_presets_file

        try:
            read_presets_file(args.steering_presets)
        except (OSError, ValueError) as exc:
            sys.exit(f"error: --steering-presets: {exc}")
    if args.feature_dashboards:
        from steerserve.analysis.dashboard_store import DashboardFileError, DashboardStore

        try:
            DashboardStore(args.feature_dashboards, readonly=True).close()
        except DashboardFileError as exc:
            sys.exit(f"error: --feature-dashboards: {exc}")
    vector_layers = _layer_list(args.steering_layers, "--steering-layers") if args.steering_layers else []
    if args.sae is None:
        for option, given in (("--sae-layers", args.sae_layers), ("--sae-k", args.sae_k)):
            if given:
                sys.exit(f"error: {option} needs --sae")
        if not vector_layers:
            return
        layers, source = [], None  # direction vectors only: no SAE anywhere
    else:
        if not args.sae_layers:
            sys.exit("error: --sae needs --sae-layers (e.g. --sae-layers 8,16,32)")
        layers = _layer_list(args.sae_layers)
        source = _checked_sae_source(args, layers)
    if source is not None:
        say_what_the_saes_were_trained_on(args.model_tag or args.model, source)
    preflight_local_model(args.model_tag or args.model, source.path if source else None, layers,
                          name=source.name if source else None, k=args.sae_k, vector_layers=vector_layers)
    if args.worker_extension_cls and args.worker_extension_cls != WORKER_EXTENSION_CLS:
        sys.exit("error: --worker-extension-cls cannot be combined with --sae or --steering-layers (steerserve "
                 "sets its own)")
    config = PluginConfig(
        sae_path=source.path if source else "",
        sae_layers=tuple(sorted(set(layers))),
        steering_layers=tuple(sorted(set(vector_layers))),
        sae_name=source.name if source else None,
        sae_k=args.sae_k,
        sae_hub_url=source.hub_url if source else None,
        max_features=args.max_steering_features,
        max_configs=args.max_steering_configs,
        max_vectors=args.max_steering_vectors,
        steering_kernel=args.steering_kernel,
        # vLLM defaults --api-server-count to the data-parallel size when it is not given.
        api_servers=max(1, getattr(args, "api_server_count", None) or getattr(args, "data_parallel_size", 1) or 1),
        max_store_mib=args.max_worker_store_mib,
    )
    args.additional_config = {**(args.additional_config or {}), ADDITIONAL_CONFIG_KEY: config.to_dict()}
    args.worker_extension_cls = WORKER_EXTENSION_CLS
    refuse_unverified_row_layouts(args)
    choose_model_runner()
    refuse_model_runner_overrides(args)
    if not is_cpu_build():
        keep_steering_out_of_cuda_graphs(args)
        explain_tensor_parallel_fusion(args)


def _checked_sae_source(args: argparse.Namespace, layers: list[int]):
    """The --sae set (fetched from the hub if it is a repo id), with a file for every layer."""
    from steerserve_sae.sae.loading import SAELoadError, discover_sae_layers, qwen_scope_k
    from steerserve.sae_source import SAESourceError, resolve_sae_source

    try:
        source = resolve_sae_source(args.sae, layers)
    except SAESourceError as exc:
        sys.exit(f"error: --sae: {exc}")
    try:
        available = discover_sae_layers(source.path)
        qwen_scope_k(source.path, name=source.name, k=args.sae_k)
    except SAELoadError as exc:
        sys.exit(f"error: --sae {args.sae}: {exc}")
    missing = [n for n in layers if n not in available]
    if missing:
        sys.exit(f"error: --sae {args.sae} has no SAE for layers {missing}; it has layers {sorted(available)}")
    return source


def say_what_the_saes_were_trained_on(model: str, source) -> None:
    """One line at start-up when a Qwen-Scope set's name says it was trained on another model
    than the one served (a Base set on its instruct model, say). Its width and d_model are
    still checked against the model when the layers load."""
    from steerserve_sae.sae.formats.qwen_scope import trained_on
    from steerserve_sae.sae.loading import sae_name_of

    sae_model = trained_on(source.name, source.repo_id)
    served = model.rstrip("/").rsplit("/", 1)[-1] if not os.path.isdir(model) else sae_name_of(model)
    if sae_model is None or served.lower() == sae_model.rsplit("/", 1)[-1].lower():
        return
    print(f"steerserve: the SAEs {source.repo_id or source.path} were trained on {sae_model}, not on the served "
          f"model {model}: measure how well they fit it with `steerserve eval` (FVU, KL) before trusting features",
          file=sys.stderr)


def _check_vllm_version() -> None:
    """Before anything else of vLLM is imported or any process starts: the plugin's patches are
    verified against the releases compat.VERIFIED_VLLM_VERSIONS lists per build, and an
    unverified one must end in the guard's message, not in an import error of a moved symbol."""
    from steerserve_sae.vllm_hooks.compat import VLLMCompatibilityError, check_vllm_version

    try:
        warning = check_vllm_version()
    except VLLMCompatibilityError as exc:
        sys.exit(f"error: {exc}")
    if warning:
        print(f"steerserve: WARNING: {warning}", file=sys.stderr)


def refuse_another_servers_data_dir(args: argparse.Namespace) -> None:
    """Before the engine loads: a --data-dir whose batch runner belongs to a server of another
    model or SAE is refused (server/steerserve/batch/identity.py); this server's batches would never run."""
    from steerserve.batch.identity import DataDirInUse, RunnerLock, server_identity
    from steerserve.db import DatabaseUrlError, is_shared, postgres_url

    url = getattr(args, "database_url", None)
    if is_shared(url):  # a fleet's database: no runner lock (runners claim lines)
        try:
            postgres_url(url)
        except DatabaseUrlError as exc:
            sys.exit(f"error: {exc}")
        return
    try:
        RunnerLock(os.path.abspath(args.data_dir)).refuse_other_holder(server_identity(args))
    except DataDirInUse as exc:
        sys.exit(f"error: {exc}")


def build_parser():
    """vLLM's serve parser under `steerserve`, with the SAE options; vLLM's FlexibleArgumentParser
    reads `--config FILE.yaml` for the `serve` subcommand it finds in the arguments."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from steerserve.cli.help import SERVE_DESCRIPTION, SERVE_EPILOG, serve_usage, stating_defaults_once

    parser = FlexibleArgumentParser(prog="steerserve", description="SAE-steerable OpenAI-compatible server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = ServeSubcommand().subparser_init(commands)
    serve.usage, serve.description, serve.epilog = serve_usage(), SERVE_DESCRIPTION, SERVE_EPILOG  # not vLLM's
    serve.formatter_class = stating_defaults_once(serve.formatter_class)
    add_steering_args(serve)
    # Batch lines go at priority 1 behind interactive requests, which needs priority scheduling;
    # a --scheduling-policy given on the command line or in --config still wins.
    serve.set_defaults(scheduling_policy="priority")
    return parser


def serve(argv: list[str]) -> None:
    """`steerserve serve ARGV`: checks the SAE options, then runs vLLM's serve until it stops."""
    if is_cpu_build():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    _check_vllm_version()
    from vllm.entrypoints.cli.serve import ServeSubcommand

    from steerserve_sae.vllm_hooks.compat import cli_env_setup

    cli_env_setup()
    args = build_parser().parse_args(["serve", *argv])
    refuse_frontends_without_the_app(args)
    configure_steering(args)
    refuse_another_servers_data_dir(args)
    command = ServeSubcommand()
    command.validate(args)
    command.cmd(args)
