#!/usr/bin/env bash
# Before a device call: put the wheels the lent GPU machine lacks into .whl/ (git ignores it).
# The machine has torch, triton, numpy, transformers, click, safetensors and huggingface-hub but
# no diffusers and no network; diffusers is pure Python, so its wheel travels with the call.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
ls .whl
