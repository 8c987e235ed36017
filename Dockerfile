# Hybrid Mamba2/Transformer pretraining pipeline: curate, pretrain, evaluate, export.
#
# Build (on a machine with Docker and network access; the GPU is only needed at run time):
#   docker build -t hybrid-lm:latest --build-arg CUDA_ARCHS="9.0" .
# Run (mount data, checkpoints and a wandb key; see docker-compose.yml and docs/cluster.md):
#   docker run --gpus all --ipc=host -v $PWD/outputs:/workspace/outputs hybrid-lm:latest \
#       deepspeed --num_gpus=8 launch/pretrain.py --config 1.3b
#
# Base: NVIDIA's CUDA 13.0 devel image (nvcc for the CUDA extensions and DeepSpeed's op builder).
FROM nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04

ARG CUDA_ARCHS="9.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST=${CUDA_ARCHS} \
    MAX_JOBS=16 \
    HF_HUB_OFFLINE=0 \
    WANDB_MODE=offline

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev git build-essential ninja-build openssh-client pdsh libaio-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV \
    && pip install --upgrade pip setuptools wheel

WORKDIR /workspace

# 1. torch with CUDA first, at the version requirements.txt pins (CPU machines take the CPU build).
COPY requirements.txt requirements-cuda.txt ./
RUN pip install "$(grep -E '^torch==' requirements.txt)" --index-url ${TORCH_INDEX}

# 2. Everything that installs anywhere. DeepSpeed's fused ops are built now, not JIT at first use.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
    pip install --no-build-isolation -r requirements.txt

# 3. CUDA kernels, compiled for the target architectures only (CUDA_ARCHS) against the torch above.
RUN MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    FLASH_ATTN_CUDA_ARCHS="$(echo ${CUDA_ARCHS} | tr -d '.')" \
    pip install --no-build-isolation -r requirements-cuda.txt

# 4. The project.
COPY pyproject.toml README.md ./
COPY model/ model/
COPY config/ config/
COPY pipeline/ pipeline/
COPY train/ train/
COPY eval/ eval/
COPY export/ export/
COPY launch/ launch/
COPY ds_configs/ ds_configs/
COPY data_recipes/ data_recipes/
COPY scripts/ scripts/
COPY bench/ bench/
RUN pip install --no-deps -e .

# Non-root user; data, checkpoints and caches live on mounted volumes under /workspace.
RUN useradd --create-home --uid 1000 trainer \
    && mkdir -p /workspace/outputs /workspace/data /home/trainer/.cache \
    && chown -R trainer:trainer /workspace /home/trainer
USER trainer
ENV HF_HOME=/home/trainer/.cache/huggingface

# The four stages (docs/cluster.md):
#   python pipeline/curate.py --recipe production_100b --data-root /workspace/data
#   deepspeed --num_gpus=8 launch/pretrain.py --config 1.3b
#   python eval/run.py --checkpoint outputs/1.3b_100b/final --benchmarks standard
#   python launch/export.py --checkpoint outputs/1.3b_100b/final --format hf --output outputs/hf
CMD ["python", "-m", "model", "list"]
