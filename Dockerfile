# syntax=docker/dockerfile:1
#
# steerserve GPU serving image: the official vLLM 0.34 image (CUDA, torch, vLLM,
# FastAPI already installed) plus this repository installed with its `gpu` extra.
#
#   docker build -t steerserve:latest .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#       -v ~/.cache/huggingface:/root/.cache/huggingface -v /models:/models \
#       -e HF_TOKEN steerserve:latest                       # default config below
#
# Arguments after the image name replace the default CMD and go to `steerserve serve`.
FROM vllm/vllm-openai:v0.34.0

WORKDIR /app

# Copy only what the package and the shipped configs need (keeps a local .venv,
# .git, tests, etc. out of the image). README* is optional: the glob may match nothing.
COPY pyproject.toml README* ./
COPY sae_plugins/ ./sae_plugins/
COPY server/ ./server/
COPY configs/ ./configs/

# The README's GPU install: this repository with its `gpu` extra (vllm==0.34.0, which the base
# image already holds, so pip keeps the image's torch and vLLM and adds only what is missing).
# The check fails the build if pip replaced vLLM with another release.
# PIP_BREAK_SYSTEM_PACKAGES only matters if the base image's Python is marked externally managed.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir '.[gpu]' \
 && python3 -c "import vllm; assert vllm.__version__.split('+')[0] == '0.34.0', vllm.__version__" \
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
