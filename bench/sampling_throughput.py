"""Sampling throughput of the CIFAR-10 DDPM architecture under the sampler's speed options, FP and W4A8.

A UNet with the exact google/ddpm-cifar10-32 architecture (``CIFAR_UNET`` of bench/speed_cifar.py),
random weights: timing and agreement only (the FID check needs the trained model). The W4A8 model is
``tfmq_compat`` round-to-nearest with per-step activation ranges calibrated on a few FP DDIM
trajectories. For each model, batch size and option set (``gaq.models.runner``: precision, channels-last,
CUDA graphs, torch.compile) it runs DDIM (100 quadratic steps, eta 0) on fixed noise:

- a short warm-up run (builds the CUDA graphs / compiled code; reported as ``setup_s``);
- one model call on a fixed input, compared with the eager fp32 call (``eps_*``);
- timed full runs (2, or 1 when a run takes longer than ``--long_run_s``): images/s, and the final
  samples compared with the eager fp32 samples of the same noise (``sample_*``; for larger batches
  the first rows). ``host_fraction`` is the time until ``ddim_sample`` returned over the time until
  the GPU finished: well below 1 means the loop queued its steps without waiting for the device.

With CUDA graphs on the W4A8 model it also checks that AdaRound's cached fake-quantized weights (which
the graph reads) kept their addresses over the timed runs. Configurations run in priority order and
are skipped once ``--budget_s`` is spent; results are written after every configuration.

    python bench/sampling_throughput.py                                   # ~4 min on one H200
    python bench/sampling_throughput.py --device cpu --quick --out /tmp/st.json   # smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from rich.console import Console
from rich.table import Table
from speed_cifar import CIFAR_UNET

from gaq.errors import GaqError
from gaq.models.runner import ModelRunner
from gaq.models.sampling import SamplerConfig, ddim_sample, sampling_timesteps
from gaq.provenance import device_name, git_commit
from gaq.quant import AdaRoundQuantizer, QuantConfig, quantize_rtn

#: option sets, by name (SamplerConfig speed fields)
CONFIGS: dict[str, dict] = {
    "fp32": {},
    "tf32": {"precision": "tf32"},
    "bf16": {"precision": "bf16"},
    "fp32+cl": {"channels_last": True},
    "bf16+cl": {"precision": "bf16", "channels_last": True},
    "fp32+graph": {"cuda_graph": True},
    "tf32+cl+graph": {"precision": "tf32", "channels_last": True, "cuda_graph": True},
    "bf16+cl+graph": {"precision": "bf16", "channels_last": True, "cuda_graph": True},
    "bf16+cl+compile": {"precision": "bf16", "channels_last": True, "compile": True},
    "bf16+cl+compile+graph": {"precision": "bf16", "channels_last": True, "compile": True, "cuda_graph": True},
    "bf16+compile+graph": {"precision": "bf16", "compile": True, "cuda_graph": True},
    "bf16+cl+compile(max-autotune)+graph": {"precision": "bf16", "channels_last": True, "compile": True,
                                            "compile_mode": "max-autotune-no-cudagraphs", "cuda_graph": True},
}
BASELINE = "fp32"
# at the first batch size, in this order (the baseline first: every other row is compared with it)
FIRST_TIERS = [["fp32"], ["bf16+cl+graph"], ["fp32+graph"], ["bf16", "bf16+cl", "tf32", "fp32+cl", "tf32+cl+graph"]]
LARGE_CONFIGS = ["bf16+cl+graph", "bf16+cl"]
# the second reuses the first's compiled code; max-autotune (minutes of autotuning) only when named in --configs
COMPILE_CONFIGS = ["bf16+cl+compile+graph", "bf16+cl+compile", "bf16+compile+graph"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/sampling_throughput.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small UNet, 4 steps, tiny batches (smoke run)")
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="default 256 1024 (quick: 4 8)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 100; quick: 4)")
    ap.add_argument("--models", nargs="+", default=["fp", "w4a8"], choices=["fp", "w4a8"])
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                    help="option sets at the first batch size (default: all but compile, baseline first)")
    ap.add_argument("--large_configs", nargs="+", default=LARGE_CONFIGS, choices=list(CONFIGS),
                    help="option sets at the larger batch sizes")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="compile rows: auto = every model, on CUDA only; on = also on the CPU")
    ap.add_argument("--max_runs", type=int, default=2, help="timed runs per configuration")
    ap.add_argument("--long_run_s", type=float, default=3.0, help="stop after one timed run longer than this")
    ap.add_argument("--warmup_steps", type=int, default=2)
    ap.add_argument("--budget_s", type=float, default=225.0, help="start no configuration after this many seconds")
    ap.add_argument("--compile_reserve_s", type=float, default=100.0,
                    help="start the first compile row only with this much of the budget left")
    ap.add_argument("--calib_batch", type=int, default=None, help="trajectories for the W4A8 ranges (default 64)")
    ap.add_argument("--calib_every", type=int, default=5, help="calibrate on every this-many-th step")
    ap.add_argument("--peer_img_s", type=float, default=56.0,
                    help="the peers' FP fp32 figure on one H200 at batch 256 (issue 6), for the x-peers column")
    return ap.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build_unet(quick: bool) -> UNet2DModel:
    cfg = dict(CIFAR_UNET)
    if quick:  # same block types, a quarter of the width, one layer per block
        cfg.update(block_out_channels=(32, 64, 64, 64), layers_per_block=1)
    torch.manual_seed(0)
    return UNet2DModel(**cfg).eval()


def adaround_cache_ptrs(model: torch.nn.Module) -> list[int | None]:
    """Address of each AdaRound quantizer's cached fake-quantized weight (None: nothing cached)."""
    out = []
    for m in model.modules():
        if isinstance(m, AdaRoundQuantizer):
            cache = getattr(m, "_cache", None)
            out.append(None if cache is None else cache[1].data_ptr())
    return out


def build_w4a8(fp: UNet2DModel, acp: torch.Tensor, sampler: SamplerConfig, n: int, every: int,
               device: torch.device) -> tuple[torch.nn.Module, dict]:
    """tfmq_compat W4A8 RTN with per-step activation ranges from FP DDIM trajectories (eager fp32)."""
    t0 = time.perf_counter()
    ts = sampling_timesteps(len(acp), sampler.steps, sampler.spacing)
    noise = torch.randn(n, 3, fp.config.sample_size, fp.config.sample_size,
                        generator=torch.Generator().manual_seed(1)).to(device)
    batches = []

    def on_step(i, t, x, c):
        if i % every == 0:
            batches.append({"x": x.clone(), "t": t.clone(), "step": torch.full_like(t, i), "cond": dict(c)})

    ddim_sample(fp, acp, noise, sampler.eager(), on_step=on_step)
    q = quantize_rtn(fp, QuantConfig(w_bits=4, a_bits=8, preset="tfmq_compat"), batches, timesteps=ts).eval()
    sync(device)
    return q, {"calib_trajectories": n, "calib_batches": len(batches), "seconds": time.perf_counter() - t0}


def main() -> None:
    args = parse_args()
    console = Console(width=None if sys.stdout.isatty() else 220)
    device = torch.device(args.device)
    quick = args.quick
    batch_sizes = args.batch_sizes or ([4, 8] if quick else [256, 1024])
    steps = args.steps or (4 if quick else 100)
    calib_batch = args.calib_batch or (4 if quick else 64)
    every = 1 if quick else args.calib_every
    first_configs = args.configs or [c for tier in FIRST_TIERS for c in tier]
    if BASELINE in first_configs:  # the baseline runs first
        first_configs = [BASELINE] + [c for c in first_configs if c != BASELINE]
    compile_models = [] if args.compile == "off" else (
        args.models if args.compile == "on" else (args.models if device.type == "cuda" else []))

    t_start = time.perf_counter()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sampler = SamplerConfig(steps=steps, eta=0.0, spacing="quadratic", guidance_scale=1.0, clip_sample=True)
    acp = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod

    console.rule(f"[bold]sampling throughput on {device_name(device)}")
    fp = build_unet(quick).to(device)
    size = fp.config.sample_size
    models: dict[str, torch.nn.Module] = {}
    results: dict = {
        "device": device_name(device), "torch": torch.__version__, "git_commit": git_commit(), "quick": quick,
        "architecture": "google/ddpm-cifar10-32" + (" at 1/4 width, 1 layer per block (quick)" if quick else ""),
        "params": sum(p.numel() for p in fp.parameters()), "random_weights": True,
        "sampler": asdict(sampler), "batch_sizes": batch_sizes,
        "flags": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                  "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "cudnn.benchmark": torch.backends.cudnn.benchmark},
        "command": "python " + " ".join(sys.argv), "peer_img_s": args.peer_img_s, "rows": [], "quantized": None,
    }
    if "fp" in args.models:
        models["fp"] = fp
    if "w4a8" in args.models:
        console.log("quantizing W4A8 (tfmq_compat RTN, per-step activation ranges)")
        models["w4a8"], results["quantized"] = build_w4a8(fp, acp, sampler, calib_batch, every, device)
        qinfo = results["quantized"]
        console.log(f"  done in {qinfo['seconds']:.1f} s ({qinfo['calib_batches']} calibration batches)")

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(max(batch_sizes), 3, size, size, generator=gen).to(device)
    probe_t = torch.full((max(batch_sizes),), 500, dtype=torch.long, device=device)
    ref_rows = min(batch_sizes)
    reference: dict[str, dict[str, torch.Tensor]] = {}  # model -> {"samples", "eps"} of eager fp32 at the first batch

    # priority order: baselines, the fastest graphs, the graph check, larger batches' graphs, the rest, compile
    plan: list[tuple[str, int, str]] = []

    def add(m: str, b: int, c: str) -> None:
        if (m, b, c) not in plan:
            plan.append((m, b, c))

    b0 = batch_sizes[0]
    for k, tier in enumerate(FIRST_TIERS):
        for c in (c for c in tier if c in first_configs):
            for m in models:
                add(m, b0, c)
        if k == 2 and "bf16+cl+graph" in args.large_configs:
            for b in batch_sizes[1:]:
                for m in models:
                    add(m, b, "bf16+cl+graph")
    for c in first_configs:  # named with --configs but in no tier (e.g. a compile row)
        for m in models:
            add(m, b0, c)
    for b in batch_sizes[1:]:
        for m in models:
            for c in args.large_configs:
                add(m, b, c)
    for c in COMPILE_CONFIGS:
        for m in compile_models:
            add(m, b0, c)

    def write() -> None:
        tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out_path)
        out_path.with_suffix(".md").write_text(markdown(results))

    compiled_once = False  # the first compile row pays for the compilation; later ones reuse it
    for i, (mname, batch, cname) in enumerate(plan):
        model, opts = models[mname], CONFIGS[cname]
        row = {"model": mname, "batch": batch, "config": cname, "options": opts, "status": "ok"}
        results["rows"].append(row)
        elapsed = time.perf_counter() - t_start
        label = f"[{i + 1}/{len(plan)}] {mname} batch {batch} {cname}"
        first_compile = opts.get("compile") and not compiled_once
        if elapsed > args.budget_s or (first_compile and elapsed > args.budget_s - args.compile_reserve_s):
            row["status"] = f"skipped: budget ({elapsed:.0f} s spent)"
            console.log(f"{label}: {row['status']}")
            write()
            continue
        try:
            measure(row, model, acp, noise[:batch], probe_t[:batch], sampler, opts, args, device,
                    reference.get(mname), ref_rows, quantized=mname == "w4a8",
                    is_baseline=cname == BASELINE and batch == b0)
        except GaqError as err:
            row["status"] = f"unsupported: {err}"
        except Exception as err:  # keep going: one configuration must not cost the others
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            console.print_exception(max_frames=8)
            try:
                sync(device)
            except Exception:
                console.log("[red]the device is unusable after this error; stopping")
                write()
                break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row["status"] == "ok":
            compiled_once = compiled_once or bool(opts.get("compile"))
            if "_samples" in row:
                reference[mname] = {"samples": row.pop("_samples"), "eps": row.pop("_eps")}
                results.setdefault("baseline_img_per_s", {})[mname] = row["img_per_s"]
            base = results.get("baseline_img_per_s", {})
            row["speedup"] = row["img_per_s"] / base[mname] if mname in base else None
            row["speedup_vs_fp_fp32"] = row["img_per_s"] / base["fp"] if "fp" in base else None
            console.log(f"{label}: {row['img_per_s']:.1f} img/s"
                        + (f" ({row['speedup']:.2f}x)" if row["speedup"] is not None else "")
                        + f", setup {row['setup_s']:.1f} s"
                        + (f", samples rel {row['sample_rel_l2']:.2e}" if row.get("sample_rel_l2") is not None else ""))
        else:
            console.log(f"{label}: [yellow]{row['status']}")
        if mname == "w4a8" and "fp" in reference and "w4a8" in reference and "w4a8_vs_fp_rel_l2" not in results:
            results["w4a8_vs_fp_rel_l2"] = rel_l2(reference["w4a8"]["samples"], reference["fp"]["samples"])
        write()
    results["total_seconds"] = time.perf_counter() - t_start
    write()
    console.print(table(results))
    console.print(f"wrote {out_path} and {out_path.with_suffix('.md')} in {results['total_seconds']:.0f} s")


def measure(row: dict, model: torch.nn.Module, acp: torch.Tensor, noise: torch.Tensor, probe_t: torch.Tensor,
            sampler: SamplerConfig, opts: dict, args: argparse.Namespace, device: torch.device,
            ref: dict | None, ref_rows: int, quantized: bool, is_baseline: bool) -> None:
    """Fill ``row`` with the timings and the agreement of one configuration (the baseline's samples and
    one-call output go into ``row['_samples']`` / ``row['_eps']``, to become the reference)."""
    cfg = replace(sampler, **opts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    runner = ModelRunner.for_sampler(model, cfg)
    try:
        ddim_sample(runner, acp, noise, replace(cfg, steps=args.warmup_steps))
        sync(device)
        row["setup_s"] = time.perf_counter() - t0
        ptrs = adaround_cache_ptrs(model) if quantized and cfg.cuda_graph else None
        eps = runner(noise, probe_t, {})
        times, hosts, samples = [], [], None
        while len(times) < args.max_runs:
            sync(device)
            t1 = time.perf_counter()
            x = ddim_sample(runner, acp, noise, sampler)
            hosts.append(time.perf_counter() - t1)
            sync(device)
            times.append(time.perf_counter() - t1)
            samples = x if samples is None else samples
            if times[-1] > args.long_run_s:
                break
        if ptrs is not None:
            after = adaround_cache_ptrs(model)
            row["adaround_cached_weights"] = sum(p is not None for p in after)
            row["adaround_cache_stable"] = bool(ptrs == after and all(p is not None for p in after))
    finally:
        runner.release()
    row["run_seconds"] = times
    row["img_per_s"] = noise.shape[0] * len(times) / sum(times)
    row["host_fraction"] = sum(hosts) / sum(times)
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    samples, eps = samples[:ref_rows].float(), eps[:ref_rows].float()
    if is_baseline:
        row["_samples"], row["_eps"] = samples.clone(), eps.clone()
        row.update(sample_max_abs=0.0, sample_rel_l2=0.0, eps_max_abs=0.0, eps_rel_l2=0.0)
    elif ref is not None:
        row["sample_max_abs"] = float((samples - ref["samples"]).abs().max())
        row["sample_rel_l2"] = rel_l2(samples, ref["samples"])
        row["eps_max_abs"] = float((eps - ref["eps"]).abs().max())
        row["eps_rel_l2"] = rel_l2(eps, ref["eps"])
    row["finite"] = bool(torch.isfinite(samples).all())


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS = ["model", "batch", "config", "img/s", "speedup", "x FP fp32", "x peers", "setup s", "host frac",
           "samples max|d|", "samples rel", "eps rel", "peak GiB", "status"]


def _cells(r: dict, peer: float, cuda: bool, width: int | None = None) -> list[str]:
    ok = r["status"] == "ok"
    note = r["status"] if not ok else ("" if r.get("adaround_cache_stable") is None
                                       else f"AdaRound cache stable: {r['adaround_cache_stable']}")
    note = note if width is None or len(note) <= width else note[:width - 1] + "…"
    return [r["model"], str(r["batch"]), r["config"], _f(r.get("img_per_s"), ".1f"), _f(r.get("speedup"), ".2f"),
            _f(r.get("speedup_vs_fp_fp32"), ".2f"),
            _f(r["img_per_s"] / peer if ok and cuda and peer else None, ".2f"),
            _f(r.get("setup_s"), ".1f"), _f(r.get("host_fraction"), ".2f"), _f(r.get("sample_max_abs"), ".2e"),
            _f(r.get("sample_rel_l2"), ".2e"), _f(r.get("eps_rel_l2"), ".2e"), _f(r.get("peak_gib"), ".1f"), note]


def markdown(res: dict) -> str:
    cuda = res["device"] != "cpu"
    s = res["sampler"]
    lines = [f"# Sampling throughput, CIFAR-10 DDPM architecture ({res['params'] / 1e6:.1f}M params, random weights)",
             "", f"{res['device']}, torch {res['torch']}, commit {res['git_commit']}; DDIM {s['steps']} {s['spacing']} "
             f"steps, eta {s['eta']}; flags at start {res['flags']}.", f"Command: `{res['command']}`", "",
             "speedup: over the same model's eager fp32 at the first batch size; x FP fp32: over the FP model's; "
             f"x peers: over the peers' {res['peer_img_s']} img/s (FP, fp32, H200, batch 256). samples / eps: "
             "difference from the eager fp32 final samples / one model call on the same input (first rows).", ""]
    if res.get("w4a8_vs_fp_rel_l2") is not None:
        lines += [f"Scale of the quantization error itself: W4A8 vs FP samples (both eager fp32), relative L2 "
                  f"{res['w4a8_vs_fp_rel_l2']:.2e}.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r, res["peer_img_s"], cuda)) + " |" for r in res["rows"]]
    if "total_seconds" in res:
        lines += ["", f"Total {res['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def table(res: dict) -> Table:
    t = Table(title=f"sampling throughput, {res['device']}")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "config", "status") else "right")
    for r in res["rows"]:
        t.add_row(*_cells(r, res["peer_img_s"], res["device"] != "cpu", width=48))
    return t


if __name__ == "__main__":
    main()
