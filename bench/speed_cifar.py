"""Calibration speed at paper settings on a UNet with the exact architecture of google/ddpm-cifar10-32.

Random weights (timing only), the CIFAR-10 calibration protocol (DDIM 100 quadratic, every 5th step,
256 per step = 5,120 tuples), W4A8 under tfmq_compat, batch 32. Each unit runs ``--iters`` AdaRound
iterations (and ``--meta_iters`` GAC meta steps); seconds per iteration are measured per unit after a
warm-up and projected to the paper's 20,000 iterations (and 1,500 meta steps) per unit.

    python bench/speed_cifar.py --out bench/results/speed_cifar_h200.json [--methods uniform gac]

Writes a JSON with per-unit timings and the projection, plus a markdown summary beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from diffusers import DDPMScheduler, UNet2DModel

from gaq.calib.driver import CalibrationJob, run_calibration
from gaq.calib.gac import GACConfig
from gaq.calib.gac_driver import DiagnosticsConfig, GACHooks
from gaq.calib.recon import ReconConfig
from gaq.data.calibset import CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import CalibrationDataModule, SplitConfig
from gaq.models.loading import Denoiser
from gaq.provenance import device_name, git_commit
from gaq.quant import QuantConfig

# google/ddpm-cifar10-32 unet/config.json
CIFAR_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional",
    dropout=0.1,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Wall time of each Lightning step (synchronised), per unit."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def on_train_batch_start(self, trainer, module, *args):
        _sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *args):
        _sync()
        self.times.setdefault(module.unit_name, []).append(time.perf_counter() - self._t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/speed_cifar.json")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--meta_iters", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=["uniform", "gac"])
    ap.add_argument("--samples_per_step", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UNet2DModel(**CIFAR_UNET).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    den = Denoiser(model, sched.alphas_cumprod, (3, 32, 32), "none", source="ddpm-cifar10-32 architecture, random weights")
    ccfg = CalibSetConfig(steps=100, spacing="quadratic", interval=5, samples_per_step=args.samples_per_step,
                          clip_sample=False, batch_size=256)
    t0 = time.time()
    calib = generate_calibration_set(den, ccfg, device, progress=False)
    gen_s = time.time() - t0
    results = {"device": device_name(device), "torch": torch.__version__, "git_commit": git_commit(),
               "params": sum(p.numel() for p in model.parameters()), "calibration_set": len(calib),
               "calibration_set_seconds": gen_s, "iters_measured": args.iters, "meta_iters_measured": args.meta_iters,
               "methods": {}}
    for method in args.methods:
        timer = StepTimer()
        dm = CalibrationDataModule("cifar-arch", ccfg, SplitConfig()).attach(denoiser=den, calib_set=calib)
        dm.setup("fit")
        run_dir = Path(f"/tmp/gaq_speed_{method}")
        shutil.rmtree(run_dir, ignore_errors=True)
        recon = ReconConfig(iters=args.iters, batch_size=32, ckpt_every=0, cache_batch=256)
        hooks = (GACHooks(GACConfig(meta_iters=args.meta_iters), dm, run_dir, DiagnosticsConfig(enabled=False))
                 if method == "gac" else None)

        def make_trainer(unit_dir, name, _timer=timer):
            return pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                              limit_val_batches=0, enable_checkpointing=False, callbacks=[_timer])

        job = CalibrationJob(den, dm, QuantConfig(w_bits=4, a_bits=8), method, recon, run_dir, make_trainer, device,
                             {"bench": method, "t": time.time()}, hooks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        summary = run_calibration(job)
        wall = time.time() - t0
        per_unit = []
        for u in summary["units"]:
            steps = timer.times.get(u["name"], [])
            meta = steps[:args.meta_iters] if method == "gac" and u["kind"] != "time" else []
            rec = steps[len(meta):]
            rec_s = sorted(rec[5:])[len(rec[5:]) // 2] if len(rec) > 5 else float("nan")   # median after warm-up
            meta_s = sorted(meta[3:])[len(meta[3:]) // 2] if len(meta) > 3 else 0.0
            overhead = u["seconds"] - sum(steps)
            per_unit.append({"name": u["name"], "kind": u["kind"], "sec_per_iter": rec_s, "sec_per_meta_step": meta_s,
                             "other_seconds": overhead,
                             "projected_seconds": rec_s * 20000 + meta_s * (1500 if meta else 0) + overhead})
        results["methods"][method] = {
            "wall_seconds_measured_run": wall, "units": per_unit, "num_units": len(per_unit),
            "activation_calibration_seconds": summary["activation_calibration_seconds"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
            "projected_total_minutes": (sum(p["projected_seconds"] for p in per_unit)
                                        + summary["activation_calibration_seconds"] + gen_s) / 60,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    lines = [f"# Calibration speed, CIFAR-10 DDPM architecture ({results['params'] / 1e6:.1f}M params), "
             f"{results['device']}, torch {results['torch']}, commit {results['git_commit']}", "",
             f"Calibration set: {len(calib)} tuples in {gen_s:.1f} s. W4A8 tfmq_compat, batch 32, fp32 eager.", "",
             "| method | units | s/iter (median over units by kind) | s/meta step | projected total @20k iters (+1.5k meta) | peak GiB |",
             "|---|---|---|---|---|---|"]
    for method, r in results["methods"].items():
        kinds: dict[str, list[float]] = {}
        for p in r["units"]:
            kinds.setdefault(p["kind"], []).append(p["sec_per_iter"])
        per_kind = ", ".join(f"{k} {1e3 * sorted(v)[len(v) // 2]:.2f} ms" for k, v in kinds.items())
        metas = [p["sec_per_meta_step"] for p in r["units"] if p["sec_per_meta_step"]]
        meta = f"{1e3 * sorted(metas)[len(metas) // 2]:.1f} ms" if metas else "-"
        lines.append(f"| {method} | {r['num_units']} | {per_kind} | {meta} | {r['projected_total_minutes']:.1f} min | "
                     f"{r['peak_memory_gib']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
