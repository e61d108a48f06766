#!/usr/bin/env bash
# The GPU check on a lent GPU machine: `bash scripts/device_gpu_check.sh` from the repository
# root, with the diffusers wheel in .whl/ (see benchmarks/README.md, "Running it on a lent GPU").
# Writes results.json, results.md, log.txt (filtered of torch.compile warnings), log-full.txt and
# nvidia-smi.txt into $OUT. BUDGET_S (default 450) is the check's budget; a hard timeout
# 90 s later sends SIGTERM, which still saves the part in progress.
set -u -o pipefail
out="${OUT:?set OUT to the folder for the results}"
budget="${BUDGET_S:-450}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: no diffusers wheel in .whl/"; exit 2; }
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,utilization.gpu,memory.used \
    --format=csv > "$out/nvidia-smi.txt" 2>&1
timeout -k 20 -s TERM $((budget + 90)) \
    python3 scripts/gpu_check.py --gpu --budget-s "$budget" --out "$out" 2>&1 \
    | tee "$out/log-full.txt" \
    | grep --line-buffered -v -E 'Warning: |warnings\.warn\(|warn_once\(|^W[0-9]{4} ' \
    | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
