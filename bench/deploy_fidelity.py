"""Does deployment change what a calibrated model samples? ``gaq evaluate`` of one run, fake-quantized and
deployed, over several seeds: FID, sFID, precision, recall, class accuracy and fidelity to the FP samples.

The deployed model is an aim's check: its metrics must equal the fake-quantized model's within the
spread over seeds. Each evaluation runs in this process through the ``gaq`` CLI.

    gaq calibrate --config configs/default/calibrate.yaml --run_dir runs/default-uniform
    python bench/deploy_fidelity.py --run runs/default-uniform --out bench/results/deploy/fidelity_default
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from gaq.cli import main as gaq_main
from gaq.provenance import git_commit

METRICS = ("fid", "sfid", "precision", "recall", "accuracy", "psnr", "ssim", "fid_to_fp")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a gaq calibrate run folder")
    p.add_argument("--config", default="configs/default/evaluate.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=[1234, 1, 2])
    p.add_argument("--forms", nargs="+", default=["fake", "deployed_bf16"],
                   choices=["fake", "deployed_bf16", "deployed_fp32"])
    p.add_argument("--num_samples", type=int, default=None, help="override the config's num_samples (smoke runs)")
    p.add_argument("--eval_dir", type=Path, default=Path("runs/deploy_fidelity"))
    p.add_argument("--out", type=Path, default=Path("bench/results/deploy/fidelity_default"))
    return p.parse_args()


def evaluate(args, form: str, seed: int) -> dict:
    out = args.eval_dir / f"{form}-seed{seed}"
    argv = ["evaluate", "--config", args.config, "--run", str(args.run), "--out_dir", str(out), "--seed", str(seed),
            "--timestep_error.enabled", "false"]
    if args.num_samples:
        argv += ["--num_samples", str(args.num_samples), "--batch_size", str(args.num_samples),
                 "--fidelity.num_samples", str(args.num_samples)]
    if form.startswith("deployed"):
        argv += ["--deploy.dtype", "bfloat16" if form.endswith("bf16") else "float32"]
    t0 = time.perf_counter()
    gaq_main(argv)
    metrics = json.loads((out / "metrics.json").read_text())
    row = {k: metrics["metrics"].get(k) for k in METRICS}
    row.update(form=form, seed=seed, seconds=round(time.perf_counter() - t0, 1), device=metrics.get("device"))
    return row


def markdown(res: dict) -> str:
    lines = [f"# Fake-quantized vs deployed: {res['run']}", "", f"Command: `{res['command']}`; commit {res['commit']}.", "",
             "| form | seed | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for r in res["rows"]:
        lines.append(f"| {r['form']} | {r['seed']} | " + " | ".join(
            "-" if r[k] is None else f"{r[k]:.4g}" for k in METRICS) + " |")
    lines += ["", "| form | " + " | ".join(f"{k} mean ± sd over seeds" for k in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS)]
    for form, s in res["summary"].items():
        lines.append(f"| {form} | " + " | ".join(f"{s[k]['mean']:.4g} ± {s[k]['sd']:.2g}" if s.get(k) else "-"
                                                 for k in METRICS) + " |")
    lines += ["", "Paired difference deployed - fake at the same seed (mean over seeds) against the seed spread "
              "(sd of the fake model's metric over seeds):", ""]
    for form, d in res["paired"].items():
        lines.append(f"- {form}: " + "; ".join(f"{k} {v['mean_diff']:+.3g} (spread {v['seed_sd']:.3g})"
                                               for k, v in d.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    res = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "run": str(args.run), "rows": []}
    for seed in args.seeds:
        for form in args.forms:
            res["rows"].append(evaluate(args, form, seed))
            print(json.dumps(res["rows"][-1]), flush=True)
    by = {f: [r for r in res["rows"] if r["form"] == f] for f in args.forms}
    res["summary"] = {f: {k: {"mean": statistics.mean(r[k] for r in rows), "sd": statistics.stdev(r[k] for r in rows)}
                          for k in METRICS if len(rows) > 1 and all(r[k] is not None for r in rows)}
                      for f, rows in by.items()}
    res["paired"] = {}
    for f in args.forms:
        if f == "fake" or "fake" not in by:
            continue
        fake = {r["seed"]: r for r in by["fake"]}
        res["paired"][f] = {k: {"mean_diff": statistics.mean(r[k] - fake[r["seed"]][k] for r in by[f]),
                                "seed_sd": res["summary"]["fake"][k]["sd"]}
                            for k in res["summary"].get("fake", {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
