# syntax=docker/dockerfile:1
#
# steerserve GPU serving image: the official vLLM 0.32 image (CUDA, torch, vLLM,
# FastAPI already installed) plus this repository's packages (sae_plugins, server).
#
#   docker build -t steerserve:latest .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#       -v ~/.cache/huggingface:/root/.cache/huggingface -v /models:/models \
#       -e HF_TOKEN steerserve:latest                       # default config below
#
# Arguments after the image name replace the default CMD and go to `steerserve serve`.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app

# Copy only what the package and the shipped configs need (keeps a local .venv,
# .git, tests, etc. out of the image). README* is optional: the glob may match nothing.
COPY pyproject.toml README* ./
COPY sae_plugins/ ./sae_plugins/
COPY server/ ./server/
COPY configs/ ./configs/

# vLLM and all its dependencies come from the base image, so install steerserve
# without dependencies (never let pip touch the image's torch/vLLM), plus pyyaml
# for --config files. PIP_BREAK_SYSTEM_PACKAGES only matters if the base image's
# Python is marked externally managed.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir pyyaml \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps . \
 && command -v steerserve

# Model weights (HF cache) and SAE files live outside the image.
VOLUME ["/root/.cache/huggingface", "/models"]

EXPOSE 8000

# Loading a 27B model, the SAE layers and compiling/capturing CUDA graphs takes
# minutes (longer on a first download), hence the long start period. Probes
# port 8000: adjust if you serve on another port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD curl -fsS http://localhost:8000/health || exit 1

ENTRYPOINT ["steerserve", "serve"]
CMD ["--config", "/app/configs/qwen3.5-27b.yaml"]
