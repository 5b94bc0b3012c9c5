#!/usr/bin/env bash
# The GAC study on the device machine (one H200), in calls of at most 10 minutes: the machine keeps its
# files between back-to-back calls, so each call continues the runs of the last (the method table reuses
# finished runs and `gaq calibrate` resumes a unit from its checkpoint).
#   bash bench/testbed/study_on_device.sh OUT STOP_S [train] -- <bench/gac_study.py arguments>
# `train` first trains checkpoints/testbed (bench/testbed/train_on_device.sh, TRAIN_BUDGET_S seconds of
# DDPM steps) and puts it in OUT as testbed.tar.part-* (under 16 MiB each). The study then runs until STOP_S
# seconds after the call's start; OUT/study.tgz holds its tables and the runs' light files (summaries,
# metrics, diagnostics; no checkpoints or weights).
set -uo pipefail
out=${1:?output folder}; stop=${2:?seconds}; shift 2
train=0; if [ "${1:-}" = train ]; then train=1; shift; fi
[ "${1:-}" = -- ] && shift
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/bin:$PATH
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m gaq.cli "$@"\n' > /tmp/bin/gaq && chmod +x /tmp/bin/gaq
if [ $train = 1 ]; then
  bash bench/testbed/train_on_device.sh runs/device "${TRAIN_BUDGET_S:-270}" 2>&1 | tee "$out/train.log"
  tar cf /tmp/testbed.tar -C runs/device testbed bench_testbed && split -b 9M /tmp/testbed.tar "$out/testbed.tar.part-"
fi
[ -d checkpoints/testbed ] || cp -r runs/device/testbed checkpoints/testbed
left=$((stop - SECONDS)); echo "study: $left s left"
[ $left -gt 30 ] && timeout "$left" python3 bench/gac_study.py "$@" 2>&1 | tee "$out/study.log"
tar czf "$out/study.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npz' \
  checkpoints/runs/gac_study bench/results/gac_study* 2>/dev/null
split -b 9M "$out/study.tgz" "$out/study.tgz.part-" && rm "$out/study.tgz"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv > "$out/gpu.txt" 2>&1
ls -la "$out"
