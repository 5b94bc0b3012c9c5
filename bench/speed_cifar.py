"""Calibration speed at paper settings on a UNet with the exact architecture of google/ddpm-cifar10-32.

Random weights (timing only), the CIFAR-10 calibration protocol (DDIM 100 quadratic, every 5th step,
256 per step = 5,120 tuples), W4A8 under tfmq_compat, batch 32, fp32. Each unit runs ``--iters``
AdaRound iterations (and ``--meta_iters`` GAC meta steps). Per unit, the steady-state seconds per
iteration (and per meta step) are measured after the first Lightning step (CUDA-graph capture,
cuDNN autotuning); everything else the unit took (input/target cache, Trainer, errors, capture) is
counted as fixed cost. The projection for the paper's 20,000 iterations (and 1,500 meta steps) per
unit is ``fixed + 20000 * s/iter + 1500 * s/meta`` summed over units, plus quantization setup,
activation calibration and calibration-set generation.

Variants: ``eager`` (one iteration per Lightning step, no CUDA graph: the plain PyTorch path) and
``graph`` (``--iters_per_step`` iterations per Lightning step, each iteration's forward and
backward replayed as a CUDA graph). For the uniform method the two variants' integer weight codes
and per-unit errors are compared (the graph must reproduce the eager result within tolerance).

    python bench/speed_cifar.py --out bench/results/speed_cifar_h200.json --variants eager graph --methods uniform gac

Writes a JSON with per-unit timings and the projection, plus a markdown summary beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from gaq.calib.api import CalibrationConfig, calibrate
from gaq.calib.gac import GACConfig
from gaq.calib.gac_driver import DiagnosticsConfig
from gaq.calib.recon import ReconConfig
from gaq.data.calibset import CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import SplitConfig
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
    """Wall time of each Lightning step (synchronised) and the work it did, per unit."""

    def __init__(self):
        self.steps: dict[str, list[tuple[float, int, int]]] = {}  # unit -> [(seconds, meta steps, iterations)]
        self.meta_graphed: dict[str, bool] = {}  # unit -> its GAC meta steps replayed a CUDA graph

    def on_train_batch_start(self, trainer, module, *args):
        _sync()
        self._t0, self._work = time.perf_counter(), (module.meta_done, module.iters_done)

    def on_train_batch_end(self, trainer, module, *args):
        _sync()
        self.steps.setdefault(module.unit_name, []).append(
            (time.perf_counter() - self._t0, module.meta_done - self._work[0], module.iters_done - self._work[1]))
        if module.meta_done > self._work[0]:
            self.meta_graphed[module.unit_name] = bool(getattr(module, "_meta_graph_state", None))


def steady_rates(steps: list[tuple[float, int, int]]) -> tuple[float, float]:
    """Seconds per meta step and per iteration, from the Lightning steps after the first of each kind."""
    meta = [s for s in steps if s[1] and not s[2]]
    rec = [s for s in steps if s[2]]
    per_meta = sum(s[0] for s in meta[1:]) / max(sum(s[1] for s in meta[1:]), 1) if len(meta) > 1 else 0.0
    per_iter = sum(s[0] for s in rec[1:]) / max(sum(s[2] for s in rec[1:]), 1) if len(rec) > 1 else float("nan")
    return per_meta, per_iter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/speed_cifar.json")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--meta_iters", type=int, default=40)
    ap.add_argument("--iters_per_step", type=int, default=50, help="of the graph variant (eager: 1)")
    ap.add_argument("--methods", nargs="+", default=["uniform", "gac"])
    ap.add_argument("--variants", nargs="+", default=["eager", "graph"])
    ap.add_argument("--samples_per_step", type=int, default=256)
    ap.add_argument("--paper_iters", type=int, default=20000)
    ap.add_argument("--paper_meta_iters", type=int, default=1500)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cuda_graph", default="auto", choices=["auto", "on"], help="of the graph variant")
    ap.add_argument("--devices", type=int, default=1, help="GPUs per run (DDP when > 1; the global batch stays 32)")
    ap.add_argument("--gac_forms", nargs="+", default=["factored"],
                    help="GAC runs: gac.hypergradient, '+batched' for gac.batched_products, '+forward' for "
                         "gac.jacobian_products forward, ':N' for gac.val_per_group N (e.g. factored+forward+batched:8)")
    ap.add_argument("--cache_dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                    help="recon.cache_dtype of each run (a run per value)")
    ap.add_argument("--cudnn_benchmark", action="store_true", help="Trainer(benchmark=True): cuDNN times its algorithms")
    ap.add_argument("--cache_caps", nargs="+", default=["none"],
                    help="recon.cache_device_max_gib per run (GiB, or none): larger caches go to the host and are staged")
    ap.add_argument("--tf32s", nargs="+", default=["conv"], choices=["conv", "all", "none"], help="recon.tf32 per run")
    args = ap.parse_args()
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set in the ranks Lightning's DDP launcher starts
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
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
               "command": "python bench/speed_cifar.py " + " ".join(f"--{k} {v if not isinstance(v, list) else ' '.join(v)}"
                                                              for k, v in vars(args).items()),
               "params": sum(p.numel() for p in model.parameters()), "calibration_set": len(calib),
               "calibration_set_seconds": gen_s, "runs": {}}
    codes: dict[str, dict[str, torch.Tensor]] = {}
    runs = [(m, v, f, c, cap, tf) for m in args.methods for v in args.variants
            for f in (args.gac_forms if m == "gac" else [None]) for c in args.cache_dtypes
            for cap in args.cache_caps for tf in args.tf32s]
    for method, variant, form, cache_dtype, cap, tf32 in runs:
        key = f"{method}-{variant}" + (f"-{form.replace(':', '-vpg').replace('+', '-')}" if form and form != "factored" else "") \
            + (f"-cache_{cache_dtype}" if cache_dtype != "float32" else "") \
            + (f"-devcap{cap}" if cap != "none" else "") + (f"-tf32_{tf32}" if tf32 != "conv" else "")
        timer = StepTimer()
        run_dir = Path(f"/tmp/gaq_speed_{key}")
        if rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        graph = variant == "graph"
        k = (args.iters_per_step if method == "uniform" else 10) if graph else 1
        recon = ReconConfig(iters=args.iters, batch_size=32, ckpt_every=0, cache_batch=256, iters_per_step=k,
                            cuda_graph=args.cuda_graph if graph else "off", cache_dtype=cache_dtype,
                            cache_device_max_gib=None if cap == "none" else float(cap), tf32=tf32)
        cfg = CalibrationConfig(method=method, quant=QuantConfig(w_bits=4, a_bits=8), recon=recon,
                                gac=gac_config(args.meta_iters, form) if method == "gac" else GACConfig(),
                                diagnostics=DiagnosticsConfig(enabled=False), split=SplitConfig())
        trainer = {"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": args.devices,
                   "strategy": "ddp" if args.devices > 1 else "auto", "enable_progress_bar": False, "callbacks": [timer],
                   "benchmark": args.cudnn_benchmark}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        summary = calibrate(den, cfg, calib, run_dir=run_dir, trainer=trainer,
                            record_extra={"bench": key, "t": time.time()}).gaq_summary
        wall = time.time() - t0
        per_unit = []
        for u in summary["units"]:
            steps = timer.steps.get(u["name"], [])
            per_meta, per_iter = steady_rates(steps)
            metas, iters = sum(s[1] for s in steps), sum(s[2] for s in steps)
            fixed = u["seconds"] - per_iter * iters - per_meta * metas
            per_unit.append({
                "name": u["name"], "kind": u["kind"], "sec_per_iter": per_iter, "sec_per_meta_step": per_meta,
                "fixed_seconds": fixed, "meta_graphed": timer.meta_graphed.get(u["name"]), "cache_seconds": u["cache_seconds"], "error_after": u["error_after"],
                "cache_gib": (u.get("cache_bytes") or 0) / 2**30, "cache_on": u.get("cache_on"),
                "cache_reads": (u.get("extra") or {}).get("cache_reads"),
                "peak_memory_gib": (u.get("peak_memory_bytes") or 0) / 2**30,
                "projected_seconds": fixed + per_iter * args.paper_iters
                + per_meta * (args.paper_meta_iters if metas else 0)})
        setup_s = summary["calibration_seconds"] - sum(u["seconds"] for u in summary["units"]) \
            - summary["activation_calibration_seconds"]
        results["runs"][key] = {
            "method": method, "variant": variant, "gac_form": form, "cache_dtype": cache_dtype, "iters_per_step": k,
            "cache_device_max_gib": cap, "tf32": tf32, "wall_seconds_measured_run": wall,
            "units": per_unit, "num_units": len(per_unit), "setup_seconds": setup_s,
            "activation_calibration_seconds": summary["activation_calibration_seconds"],
            # the run's peak as the driver measured it (it resets CUDA's peak counter at each unit)
            "peak_memory_gib": (summary.get("peak_memory_bytes") or float("nan")) / 2**30,
            "projected_total_minutes": (sum(p["projected_seconds"] for p in per_unit) + setup_s
                                        + summary["activation_calibration_seconds"] + gen_s) / 60,
        }
        codes[key] = load_file(str(run_dir / "quantized" / "quantized.safetensors"))
        print(key, json.dumps({k: v for k, v in results["runs"][key].items() if k != "units"}), flush=True)
        results["agreement"] = _agreement(codes, results["runs"])
        results["devices"] = args.devices
        if rank == 0:
            _write(results, Path(args.out), args)  # after every run, so a cut-off bench keeps what finished


def gac_config(meta_iters: int, form: str) -> GACConfig:
    """The GAC settings of a ``--gac_forms`` entry: ``hypergradient[+option...][:val_per_group]``."""
    hypergradient, _, per_group = form.partition(":")
    hypergradient, *options = hypergradient.split("+")
    return GACConfig(meta_iters=meta_iters, hypergradient=hypergradient, batched_products="batched" in options,
                     jacobian_products="forward" if "forward" in options else "reverse",
                     val_per_group=int(per_group) if per_group else None)


def _agreement(codes: dict, runs: dict) -> dict:
    """Against a reference run of the same method: eager against graph, and a float32 cache against a
    narrower one (same variant and form): share of identical packed weight-code bytes, largest relative
    difference of the per-unit validation errors."""
    out = {}
    pairs = [(f"{r['method']}-eager", f"{r['method']}-graph", f"{r['method']}: graph vs eager")
             for r in runs.values()]
    pairs += [(key.removesuffix(f"-cache_{r['cache_dtype']}"), key, f"{key}: {r['cache_dtype']} cache vs float32")
              for key, r in runs.items() if r.get("cache_dtype", "float32") != "float32"]
    for key, r in runs.items():  # a capped device cache (host-staged units) and TF32 matmuls against the plain run
        base = key.replace(f"-devcap{r.get('cache_device_max_gib')}", "").replace(f"-tf32_{r.get('tf32')}", "")
        if base != key:
            pairs.append((base, key, f"{key} vs {base}"))
    for ref, other, label in dict.fromkeys(pairs):
        a, b = codes.get(ref), codes.get(other)
        if a is None or b is None:
            continue
        keys = [k for k in a if a[k].dtype == torch.uint8]
        same = sum(int((a[k] == b[k]).sum()) for k in keys)
        total = sum(a[k].numel() for k in keys)
        ea = [u["error_after"] for u in runs[ref]["units"]]
        eb = [u["error_after"] for u in runs[other]["units"]]
        rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(ea, eb))
        out[label] = {"identical_code_bytes": same / max(total, 1), "max_rel_error_after_diff": rel}
    return out


def _write(results: dict, out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    lines = [f"# Calibration speed, CIFAR-10 DDPM architecture ({results['params'] / 1e6:.1f}M params), "
             f"{results['device']}, torch {results['torch']}, commit {results['git_commit']}", "",
             f"`{results['command']}`", "",
             f"Calibration set: {results['calibration_set']} tuples in {results['calibration_set_seconds']:.1f} s. "
             f"W4A8 tfmq_compat, batch 32, fp32; {args.iters} iterations per unit measured, projected to "
             f"{args.paper_iters} (+{args.paper_meta_iters} meta steps for GAC).", "",
             "| method | variant | units | ms/iter by unit kind (median) | ms/meta step | fixed s/unit (median) "
             "| projected total | peak GiB | largest unit peak GiB | largest cache GiB (where) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"].values():
        kinds: dict[str, list[float]] = {}
        for p in r["units"]:
            kinds.setdefault(p["kind"], []).append(p["sec_per_iter"])
        per_kind = ", ".join(f"{k} {1e3 * _median(v):.2f}" for k, v in kinds.items())
        metas = [p["sec_per_meta_step"] for p in r["units"] if p["sec_per_meta_step"]]
        meta = f"{1e3 * _median(metas):.1f}" if metas else "-"
        graphed = [p["meta_graphed"] for p in r["units"] if p.get("meta_graphed") is not None]
        if graphed:
            meta += f" ({sum(graphed)}/{len(graphed)} units graphed)"
        fixed = _median([p["fixed_seconds"] for p in r["units"]])
        form = f", {r['gac_form']}" if r.get("gac_form") else ""
        form += f", {r['cache_dtype']} cache" if r.get("cache_dtype", "float32") != "float32" else ""
        form += f", device cache <= {r['cache_device_max_gib']} GiB" if r.get("cache_device_max_gib", "none") != "none" else ""
        form += f", TF32 {r['tf32']}" if r.get("tf32", "conv") != "conv" else ""
        big = max(r["units"], key=lambda p: p.get("cache_gib", 0.0))
        unit_peak = max(p.get("peak_memory_gib", 0.0) for p in r["units"])
        lines.append(f"| {r['method']}{form} | {r['variant']} (K={r['iters_per_step']}) | {r['num_units']} | {per_kind} | "
                     f"{meta} | {fixed:.1f} | {r['projected_total_minutes']:.1f} min | {r['peak_memory_gib']:.1f} | "
                     f"{unit_peak:.1f} | {big.get('cache_gib', 0.0):.2f} ({big.get('cache_on')}, {big['name']}) |")
    if results.get("agreement"):
        lines += ["", "Agreement (same seed and data): "
                  + "; ".join(f"{m}: {100 * a['identical_code_bytes']:.3f}% identical packed code bytes, per-unit "
                              f"validation error within {100 * a['max_rel_error_after_diff']:.3f}%"
                              for m, a in results["agreement"].items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _median(v: list[float]) -> float:
    v = sorted(x for x in v if x == x)
    return v[len(v) // 2] if v else float("nan")


if __name__ == "__main__":
    main()
