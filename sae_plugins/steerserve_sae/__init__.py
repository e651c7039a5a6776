"""vLLM model-executor plugin: SAE steering at chosen decoder layers, per request.

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process (API server,
engine core, workers) before any model is built, possibly more than once, so it is idempotent.
Installing the package must not change other vLLM programs on the same machine, so it patches
vLLM only in processes started by `steerserve serve`, which sets ACTIVATION_ENV for vLLM's
processes to inherit; even there the runner hooks stay inert unless the engine's
`additional_config` names an SAE (see plugin_config.py).
"""

import logging
import os

ACTIVATION_ENV = "STEERSERVE_ACTIVE"


def register() -> None:
    if os.environ.get(ACTIVATION_ENV) != "1":
        return
    from steerserve_sae.vllm_hooks.compat import check_vllm_version

    warning = check_vllm_version()  # raises for a vLLM the patches were not verified against
    if warning:
        logging.getLogger("vllm.steerserve").warning("steerserve: %s", warning)
    from steerserve_sae.vllm_hooks import upstream_fixes
    from steerserve_sae.vllm_hooks.runner_patch import patch_model_runners
    from steerserve_sae.backends.op import register_as_splitting_op

    upstream_fixes.install()
    register_as_splitting_op()
    patch_model_runners()
