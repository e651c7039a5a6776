"""vLLM model-executor plugin: SAE steering at chosen decoder layers, per request.

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process (API server,
engine core, workers) before any model is built, possibly more than once, so it is idempotent.
It patches vLLM's model runner; the patches stay inert unless the engine's `additional_config`
names an SAE (see plugin_config.py).
"""


def register() -> None:
    from .runner_patch import patch_model_runners
    from .steering_op import register_as_splitting_op

    register_as_splitting_op()
    patch_model_runners()
