# The distar image for Ray clusters on GPUs (KubeRay head, workers, Serve replicas, the MLflow server).
#   docker build -t distar:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t distar:0.1.0 .
#
# Base: Ray's own GPU image, not a bare nvidia/cuda one, because
#   - KubeRay runs `ray start` from the image, and head, workers and the job submitter must run the same Ray
#     and Python versions: the tag pins both (Ray 2.60.0, inside pyproject's ray range; Python 3.11, the
#     version the project is developed and tested on), and deploy/kuberay/*.yaml name the same rayVersion;
#   - its -gpu variant is built on nvidia/cuda's cudnn *runtime* image (CUDA libraries, no compilers), runs
#     as the non-root user `ray` (uid 1000) that KubeRay's examples assume, and carries Ray's extras
#     (dashboard, autoscaler, Serve proxy) built for that Ray.
# torch's CUDA libraries come with the torch wheels (nvidia-* packages), so the CUDA version that matters is
# the wheels': TORCH_INDEX_URL picks it (cu126, cu128, ...; .../whl/cpu for a CPU image; empty = PyPI's
# default Linux build, which is a CUDA one). The node's driver must support that CUDA version.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app

# The dependency source is the Makefile's: the torch pair from requirements/torch.txt first (its own layer:
# the biggest and the least often changed), then the project with pyproject.toml's pins.
COPY --chown=ray:users requirements/torch.txt requirements/torch.txt
RUN pip install ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} -r requirements/torch.txt

COPY --chown=ray:users . /app
RUN pip install -e . \
    && python -c "import torch, torchvision, distar, services, jobs.train; print('torch', torch.__version__)"

# `python -m jobs.train` (the RayJob's entrypoint) and Serve's import paths (services.*) resolve from any
# working directory: Ray starts jobs and replicas elsewhere, and `jobs` is not an installed package.
ENV PYTHONPATH=/app
