# syntax=docker/dockerfile:1
#
# tiller, multi-stage. Default: CUDA build (`--features cuda`) in the CUDA devel image, run in
# the matching runtime image. `--build-arg VARIANT=cpu` builds a CPU-only image instead.
#
#   docker build -t tiller:cuda .
#   docker run --gpus all -p 8080:8080 -v "$PWD/models:/models" tiller:cuda
#   docker build --build-arg VARIANT=cpu -t tiller:cpu .
#
# Build args:
#   VARIANT           cuda (default) | cpu
#   CUDA_VERSION      CUDA image tag prefix (default 13.0.2, the toolkit scripts/build-cuda.sh
#                     installs from PyPI; keep the two in step)
#   UBUNTU            ubuntu24.04 (default; the CUDA 13 images)
#   CUDA_COMPUTE_CAP  GPU compute capability candle's kernels are compiled for (the build machine
#                     usually has no GPU to detect). Default 80: the kernels tiller uses are PTX,
#                     which the driver compiles for the GPU it runs on, so an 80 build runs on
#                     Ampere (A100, 80/86), Ada (L4/4090, 89) and Hopper (H100, 90) alike; bf16
#                     needs 80 or later. Set 89 or 90 to target one architecture natively.
#   RUST_VERSION      toolchain installed with rustup (default 1.95.0, the one CI uses; at least
#                     1.87, Cargo.toml's rust-version)

ARG VARIANT=cuda
ARG CUDA_VERSION=13.0.2
ARG UBUNTU=ubuntu24.04

# ---- build bases --------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build-cuda
FROM ubuntu:22.04 AS build-cpu

# ---- build ----------------------------------------------------------------------------------
FROM build-${VARIANT} AS build
ARG VARIANT
ARG RUST_VERSION=1.95.0
ARG CUDA_COMPUTE_CAP=80
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    if [ "${VARIANT}" = "cuda" ]; then \
        export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP}"; \
        cargo build --release --locked --features cuda; \
    else \
        cargo build --release --locked; \
    fi; \
    install -D target/release/tiller /out/tiller

# ---- runtime bases --------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS run-cuda
FROM ubuntu:22.04 AS run-cpu

# ---- runtime --------------------------------------------------------------------------------
FROM run-${VARIANT}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --uid 10001 tiller
COPY --from=build /out/tiller /usr/local/bin/tiller
# The default shapes-world model (and toy-gmm); mount a volume on /models to serve others.
COPY models /models
# The shipped LoRA adapters (the default model's LCM-LoRA, `shapes-lcm`).
COPY adapters /adapters
COPY tiller.example.toml /etc/tiller/tiller.example.toml
ENV TILLER_BIND=0.0.0.0:8080 \
    TILLER_MODELS_DIR=/models \
    TILLER_ADAPTERS_DIR=/adapters \
    RUST_LOG=info
USER tiller
WORKDIR /home/tiller
EXPOSE 8080
# Liveness: /health answers 200 while the process serves (readiness, /ready, waits for the model).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health >/dev/null || exit 1
ENTRYPOINT ["tiller"]
CMD ["serve"]
