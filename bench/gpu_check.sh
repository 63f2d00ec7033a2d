#!/usr/bin/env bash
# The GPU check in one command, as a GPU machine without network runs it (docs/performance.md, On a GPU):
#   make gpu-bundle                       # here, once: bench/gpu/ (git-ignored, about 20 MB)
#   bash bench/gpu_check.sh [--json OUT.json] [OVERRIDE ...]    # there
# That machine has Python with torch, Lightning, torchmetrics, onnx and onnxruntime but no
# hydra-core, MLflow or DVC, and no network: hydra-core comes from bench/gpu/wheels, CIFAR-10
# from bench/gpu/cifar10-jpeg.tar.gz, repacked into the official layout. Where there is no GPU it
# stops in one line. Extra arguments go to bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUNDLE=bench/gpu
WORK=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU" >&2
  exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  if [ ! -d "$BUNDLE/wheels" ]; then
    echo "gpu_check: hydra-core is missing and there is no $BUNDLE/wheels; run make gpu-bundle on a machine with the network" >&2
    exit 1
  fi
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$BUNDLE/wheels" \
    --target "$WORK/site" hydra-core omegaconf antlr4-python3-runtime
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
DATA=${CIFAR10_DATA:-}
if [ -z "$DATA" ]; then
  if [ ! -f "$BUNDLE/cifar10-jpeg.tar.gz" ]; then
    echo "gpu_check: no $BUNDLE/cifar10-jpeg.tar.gz and no CIFAR10_DATA; run make gpu-bundle" >&2
    exit 1
  fi
  "$PYTHON" "$BUNDLE/make_cifar10_archive.py" "$WORK/cifar-10-python.tar.gz" \
    --source "$BUNDLE/cifar10-jpeg.tar.gz" > /dev/null
  DATA="$WORK/cifar-10-python.tar.gz"
fi
exec "$PYTHON" bench/gpu_check.py --data "$DATA" "$@"
