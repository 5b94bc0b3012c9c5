#!/usr/bin/env bash
# Uniform reconstruction vs GAC (and RTN, FP) on the shipped default model, several seeds, run as
# parallel processes on one GPU (each run is launch-bound, so they overlap well), then evaluated.
#   OUT=bench/results bash bench/default_methods_gpu.sh [ITERS] [META] [NUM_SAMPLES]
# Writes $OUT/default_methods.json (every run's summary + metrics) and $OUT/default_methods.md.
# SET=full (default) runs every row below; SET=seeds only uniform vs fast GAC over 3 seeds.
# RUN_TIMEOUT bounds each run (calibrate + evaluate), so the table is written whatever finishes.
set -u
ITERS=${1:-500}; META=${2:-200}; NS=${3:-1000}; OUT=${OUT:-bench/results}; SET=${SET:-full}
RUN_TIMEOUT=${RUN_TIMEOUT:-3000}
mkdir -p "$OUT" runs/gpu
GAQ="python3 -m gaq.cli"
common="--config configs/default/calibrate.yaml --trainer.accelerator gpu --trainer.enable_progress_bar false --model.recon.iters $ITERS --gac.meta_iters $META --diagnostics.enabled false"
evalargs="--config configs/default/evaluate.yaml --num_samples $NS --batch_size 500 --trainer.accelerator gpu --trainer.enable_progress_bar false"
one() {  # name, then calibrate overrides
  local name=$1; shift
  local dir=runs/gpu/$name
  timeout $RUN_TIMEOUT bash -c "$GAQ calibrate $common --run_dir $dir $* && $GAQ evaluate $evalargs --run $dir --out_dir $dir/eval" > runs/gpu/$name.log 2>&1
  echo "$name rc=$?"
}
# calibration sets and the reference statistics first, so parallel runs only read the caches
for s in 0 1 2; do $GAQ calib-data $common --data.calib.seed $s > runs/gpu/calib-data-$s.log 2>&1 & done
$GAQ evaluate $evalargs --out_dir runs/gpu/fp/eval > runs/gpu/fp.log 2>&1 &
wait
for s in 0 1 2; do
  one uniform-w4a8-s$s --method uniform --data.calib.seed $s --model.recon.seed $s &
  one gacfast-w4a8-s$s --method gac --gac.meta_lr 0.005 --gac.carry_over true --data.calib.seed $s --model.recon.seed $s &
  [ "$SET" = full ] && one gac-w4a8-s$s --method gac --data.calib.seed $s --model.recon.seed $s &
done
if [ "$SET" = full ]; then
  one rtn-w4a8-s0 --method rtn &
  one uniform-w4a32-s0 --method uniform --quant.a_bits 32 &
  one gac-w4a32-s0 --method gac --quant.a_bits 32 &
fi
wait
python3 - "$OUT" <<'PY'
import json, sys, glob, os, statistics as st
out = sys.argv[1]; rows = {}
for d in sorted(glob.glob("runs/gpu/*/")):
    name = os.path.basename(d.rstrip("/"))
    r = {}
    for f, key in (("summary.json", "summary"), ("eval/metrics.json", "metrics")):
        p = os.path.join(d, f)
        if os.path.exists(p):
            r[key] = json.load(open(p))
    rows[name] = r
json.dump(rows, open(f"{out}/default_methods.json", "w"), indent=1, default=str)
def m(r, k):
    v = r.get("metrics", {}); v = v.get("metrics", v)
    return v.get(k)
groups = {}
for name, r in rows.items():
    g = name.rsplit("-s", 1)[0] if "-s" in name else name
    groups.setdefault(g, []).append(r)
lines = ["| config | runs | FID | precision | recall | class acc | calib s |", "|---|---|---|---|---|---|---|"]
def fmt(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals: return "-"
    return f"{st.mean(vals):.3f} ± {st.pstdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"
for g, rs in sorted(groups.items()):
    lines.append(f"| {g} | {len(rs)} | " + " | ".join(fmt([m(r, k) for r in rs]) for k in ("fid", "precision", "recall", "accuracy"))
                 + " | " + fmt([r.get("summary", {}).get("calibration_seconds") for r in rs]) + " |")
open(f"{out}/default_methods.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
