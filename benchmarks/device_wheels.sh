#!/usr/bin/env bash
# The wheels benchmarks/device_check.py needs on the GPU machine beyond what it has (Python 3.12,
# jax (CUDA), flax, optax, orbax-checkpoint, transformers (with PyYAML), numpy, tqdm, chex,
# absl-py; no package registry there), downloaded here into .whl/ (ignored by git), for
# Python 3.12 / manylinux x86_64. They travel with the working tree (at most 64 MiB).
#
#   bash benchmarks/device_wheels.sh
#
# Only ml-collections is missing: the check imports configs/*.py and eavl_jax's models, step
# and model_info, never the data pipeline (grain, tensorflow-datasets, array-record,
# pycocotools), which tests/test_device_check.py holds it to. On the GPU machine
# (docs/performance.md, "On a GPU"):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  ml-collections==1.1.0   # pure Python; needs absl-py and PyYAML, both there
)
rm -rf .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl
echo "total: ${bytes} bytes"
if (( bytes > 64 * 1024 * 1024 )); then
  echo "more than the 64 MiB that may travel" >&2
  exit 1
fi
