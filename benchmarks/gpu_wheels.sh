#!/usr/bin/env bash
# Run here before a GPU run: the wheels benchmarks/gpu.sh installs on the GPU machine, which has torch but an older
# Transformers and no package index. This checkout's vr-hf and the Transformers installed here go into .whl/ (ignored
# by git, carried by the call: device run with command "bash benchmarks/gpu.sh" and carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip wheel --quiet --no-deps --wheel-dir .whl .
transformers=$(python3 -c 'import transformers; print(transformers.__version__)')
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --dest .whl "transformers==$transformers"
ls -l .whl
