#!/usr/bin/env bash
# How checkpoints/testbed was trained on the device machine (one H200): a 300-step probe of
# `gaq train-testbed` gives the seconds per step, the step count is set to fill TRAIN_BUDGET_S
# seconds of DDPM training (rounded down to 500 steps), then the real run goes. The step count used
# is in bench/testbed/train_config.yaml (trainer.max_steps) and report.json, so the run is
# reproducible from configs/testbed/train.yaml with that --trainer.max_steps.
#   bash bench/testbed/train_on_device.sh OUT_DIR [TRAIN_BUDGET_S]
set -euo pipefail
out=${1:?output folder}; budget=${2:-270}
probe=$(mktemp -d)
gaq train-testbed --config configs/testbed/train.yaml --trainer.max_steps 300 --trainer.enable_progress_bar false \
  --classifier.max_steps 5 --report.num_samples 10 --report.batch_size 10 --report.grid_rows 1 \
  --out_dir "$probe/ckpt" --bench_dir "$probe/bench" > "$probe/log" 2>&1 || { cat "$probe/log"; exit 1; }
steps=$(python3 -c "
import json; r = json.load(open('$probe/bench/report.json'))
per = r['ddpm']['train_seconds'] / r['ddpm']['steps']
print(max(500, int($budget / per) // 500 * 500))")
echo "probe: $(python3 -c "import json; r=json.load(open('$probe/bench/report.json')); print(r['ddpm']['train_seconds'])") s for 300 steps -> max_steps $steps"
gaq train-testbed --config configs/testbed/train.yaml --trainer.max_steps "$steps" --trainer.enable_progress_bar false \
  --out_dir "$out/testbed" --bench_dir "$out/bench_testbed"
