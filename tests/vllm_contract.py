"""Every vLLM symbol steerserve patches, subclasses or reads, and how a release's source is
checked for it (tests/test_vllm_contract.py).

The check reads source, not a running vLLM: a CUDA release cannot run here. Per symbol: it is
defined where the hook imports it from; its signature is the one of the installed vLLM (the
CPU build of 0.32.0, on which the whole suite runs end to end); the code path the hook assumes
still calls it (`called_in`); and the attributes the hook reads are still set (`attributes`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

V2_RUNNER = "vllm/v1/worker/gpu/model_runner.py"
V1_RUNNER = "vllm/v1/worker/gpu_model_runner.py"


@dataclass(frozen=True)
class Symbol:
    path: str  # the file under the release's root, as the hook imports it
    qualname: str  # "f", "Class" or "Class.method"
    why: str  # what steerserve does with it (the test id shows it)
    called_in: tuple[str, ...] = ()  # functions of the same file whose bodies must call it
    attributes: tuple[str, ...] = ()  # for a class: fields or `self.X =` assignments read by steerserve
    v1_only: bool = False  # exists only in releases that still have Model Runner V1
    same_signature: bool = True


CONTRACT = (
    # Model Runner V2 hooks (sae_plugins/steerserve_sae/vllm_hooks/runner_patch.py)
    Symbol(V2_RUNNER, "GPUModelRunner.add_requests", "V2 hook: keeps each new request's extra_args",
           called_in=("GPUModelRunner.execute_model",)),
    Symbol(V2_RUNNER, "GPUModelRunner.prepare_inputs", "V2 hook: routes the step's rows from its InputBatch",
           called_in=("GPUModelRunner.execute_model",)),
    Symbol(V2_RUNNER, "GPUModelRunner.execute_model", "V2 hook: finished requests, dummy runs, end of step"),
    Symbol(V2_RUNNER, "GPUModelRunner.load_model", "V2 hook: loads the SAEs and patches the layers"),
    Symbol(V2_RUNNER, "GPUModelRunner", "V2 routing reads runner.req_states", attributes=("req_states",)),
    Symbol("vllm/v1/worker/gpu/input_batch.py", "InputBatch", "V2 routing reads the step's rows",
           attributes=("req_ids", "idx_mapping_np", "num_scheduled_tokens", "num_computed_tokens_np")),
    Symbol("vllm/v1/worker/gpu/states.py", "RequestState", "V2 routing reads prompt lengths",
           attributes=("prompt_len",)),
    # Model Runner V1 hooks (gone in 0.34.0)
    Symbol(V1_RUNNER, "GPUModelRunner._prepare_inputs", "V1 hook: routes the step's rows", v1_only=True,
           called_in=("GPUModelRunner.execute_model",)),
    Symbol(V1_RUNNER, "GPUModelRunner._dummy_run", "V1 hook: dummy runs clear the routing", v1_only=True),
    Symbol(V1_RUNNER, "GPUModelRunner._model_forward", "V1 hook: end of step", v1_only=True,
           called_in=("GPUModelRunner.execute_model",)),
    Symbol(V1_RUNNER, "GPUModelRunner.execute_model", "V1 hook: finished requests", v1_only=True),
    Symbol(V1_RUNNER, "GPUModelRunner.load_model", "V1 hook: loads the SAEs", v1_only=True),
    Symbol(V1_RUNNER, "GPUModelRunner", "V1 routing reads runner.requests and runner.input_batch", v1_only=True,
           attributes=("requests", "input_batch")),
    Symbol("vllm/v1/worker/gpu_input_batch.py", "InputBatch", "V1 routing reads the persistent batch",
           v1_only=True, attributes=("req_ids", "num_reqs", "num_computed_tokens_cpu", "num_prompt_tokens")),
    Symbol("vllm/v1/worker/cpu_model_runner.py", "CPUModelRunner.load_model", "V1 CPU loader hook", v1_only=True),
    # What both runners hand the hooks
    Symbol("vllm/v1/core/sched/output.py", "SchedulerOutput", "finished and new requests of a step",
           attributes=("finished_req_ids", "scheduled_new_reqs", "num_scheduled_tokens")),
    Symbol("vllm/v1/core/sched/output.py", "NewRequestData", "a new request's sampling params",
           attributes=("req_id", "sampling_params")),
    Symbol("vllm/sampling_params.py", "SamplingParams", "per-request steering travels in extra_args",
           attributes=("extra_args",), same_signature=False),
    # Steering op and CUDA graphs (backends/op.py, cli/engine_checks.py)
    Symbol("vllm/utils/torch_utils.py", "direct_register_custom_op", "registers the steering op"),
    Symbol("vllm/config/compilation.py", "CompilationConfig", "steering op as a splitting op; graph options",
           attributes=("_attention_ops", "splitting_ops", "cudagraph_mode", "pass_config"), same_signature=False),
    Symbol("vllm/config/compilation.py", "PassConfig", "fuse_attn_quant is refused with --sae",
           attributes=("fuse_attn_quant",), same_signature=False),
    Symbol("vllm/config/compilation.py", "CUDAGraphMode", "PIECEWISE / NONE only with --sae",
           attributes=("NONE", "PIECEWISE"), same_signature=False),
    Symbol("vllm/distributed/parallel_state.py", "get_tensor_model_parallel_rank", "rank 0 answers dashboards"),
    # Steered layers: model_patch.steer_layer subclasses the decoder layer and reads
    # (hidden_states, residual) from its forward; architectures.py walks these attributes.
    Symbol("vllm/model_executor/models/qwen3_next.py", "Qwen3NextDecoderLayer.forward",
           "Qwen3.5 layers (subclassed): forward returns (hidden_states, residual)"),
    Symbol("vllm/model_executor/models/qwen3_5.py", "Qwen3_5DecoderLayer", "Qwen3.5 decoder layer (subclassed)"),
    Symbol("vllm/model_executor/models/qwen3.py", "Qwen3DecoderLayer.forward", "Qwen3 layers (subclassed)"),
    Symbol("vllm/model_executor/models/qwen3_5.py", "Qwen3_5ForCausalLM", "text-only Qwen3.5: model.layers"),
    Symbol("vllm/model_executor/models/qwen3_5.py", "Qwen3_5ForConditionalGeneration",
           "the 27B's class: language_model.model.layers"),
    # CPU-build fixes (vllm_hooks/upstream_fixes.py)
    Symbol("vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py", "_causal_conv1d_fwd_cpu",
           "one-token conv1d fix (CPU)"),
    Symbol("vllm/v1/executor/multiproc_executor.py", "MultiprocExecutor._init_executor",
           "engine wait fix (CPU)"),
    Symbol("vllm/v1/executor/multiproc_executor.py", "MultiprocExecutor", "engine wait fix reads response_mqs",
           attributes=("response_mqs",)),
    Symbol("vllm/distributed/device_communicators/shm_broadcast.py", "SpinCondition",
           "engine wait fix replaces wait", attributes=("wait", "last_read", "busy_loop_s")),
    # Command line and app (cli/serve.py, endpoint_plugin.py)
    Symbol("vllm/entrypoints/cli/serve.py", "ServeSubcommand.subparser_init", "steerserve serve's parser"),
    Symbol("vllm/entrypoints/cli/serve.py", "ServeSubcommand.validate", "steerserve serve"),
    Symbol("vllm/entrypoints/cli/serve.py", "ServeSubcommand.cmd", "steerserve serve"),
    Symbol("vllm/utils/argparse_utils.py", "FlexibleArgumentParser", "steerserve serve's parser",
           same_signature=False),
    Symbol("vllm/plugins/endpoint_plugins/interface.py", "attach_endpoint_plugins", "routes and middleware"),
    Symbol("vllm/plugins/endpoint_plugins/interface.py", "init_endpoint_plugins_state", "asks the workers"),
)


def cli_env_setup_symbol(release: str) -> Symbol:
    """`cli_env_setup`, in the module compat.cli_env_setup imports it from for `release`."""
    from steerserve_sae.vllm_hooks.compat import CLI_ENV_SETUP_MODULES, CLI_ENV_SETUP_NEWEST

    module = CLI_ENV_SETUP_MODULES.get(release, CLI_ENV_SETUP_NEWEST)
    return Symbol(module.replace(".", "/") + ".py", "cli_env_setup", "steerserve serve's environment")


class Source:
    """One release's Python source under `root` (the folder holding `vllm/`)."""

    def __init__(self, root: Path):
        self.root = root
        self._trees: dict[str, ast.Module | None] = {}

    def has_v1_runner(self) -> bool:
        return (self.root / V1_RUNNER).is_file()

    def tree(self, path: str) -> ast.Module | None:
        if path not in self._trees:
            file = self.root / path
            self._trees[path] = ast.parse(file.read_text(), str(file)) if file.is_file() else None
        return self._trees[path]

    def find(self, path: str, qualname: str) -> ast.AST | None:
        node: ast.AST | None = self.tree(path)
        for part in qualname.split("."):
            if node is None:
                return None
            node = next((n for n in getattr(node, "body", ())
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part),
                        None)
        return node

    def signature(self, path: str, qualname: str) -> str | None:
        """Parameters as source text (names, kinds, defaults), or the class's bases."""
        node = self.find(path, qualname)
        if isinstance(node, ast.ClassDef):
            return ", ".join(ast.unparse(b) for b in node.bases)
        return ast.unparse(node.args) if node is not None else None

    def calls(self, path: str, caller: str, name: str) -> bool:
        """Whether `caller` calls `name(...)` or `self.name(...)` (not another object's `name`)."""
        node = self.find(path, caller)
        return node is not None and any(isinstance(n, ast.Call) and _is_own_call(n.func, name) for n in ast.walk(node))

    def attributes(self, path: str, qualname: str) -> set[str]:
        """Class-level names (fields, enum members, methods) and `self.X` assignments of a class
        and of the bases defined in the same file."""
        node = self.find(path, qualname)
        if not isinstance(node, ast.ClassDef):
            return set()
        names: set[str] = set()
        for n in node.body:  # class-level fields, enum members, methods and properties
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                names.add(n.target.id)
            elif isinstance(n, ast.Assign):
                names.update(t.id for t in n.targets if isinstance(t, ast.Name))
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(n.name)
        for n in ast.walk(node):  # `self.X = ...` in any method
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            names.update(t.attr for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                         and t.value.id == "self")
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id != qualname:
                names |= self.attributes(path, base.id)
        return names


def _is_own_call(func: ast.expr, name: str) -> bool:
    if isinstance(func, ast.Name):
        return func.id == name
    return isinstance(func, ast.Attribute) and func.attr == name and isinstance(func.value, ast.Name) \
        and func.value.id == "self"


def violations(symbol: Symbol, release: Source, reference: Source) -> list[str]:
    """What of `symbol` the release breaks; empty when the contract holds."""
    where = f"{symbol.path}:{symbol.qualname}"
    if release.find(symbol.path, symbol.qualname) is None:
        return [f"{where} is missing"]
    problems = []
    if symbol.same_signature:
        mine, verified = release.signature(symbol.path, symbol.qualname), reference.signature(symbol.path,
                                                                                               symbol.qualname)
        if mine != verified:
            problems.append(f"{where} signature ({mine}) differs from the verified one ({verified})")
    name = symbol.qualname.rsplit(".", 1)[-1]
    problems += [f"{symbol.path}:{caller} no longer calls {name}" for caller in symbol.called_in
                 if not release.calls(symbol.path, caller, name)]
    missing = set(symbol.attributes) - release.attributes(symbol.path, symbol.qualname)
    if missing:
        problems.append(f"{where} lacks {sorted(missing)}")
    return problems
