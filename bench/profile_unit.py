"""Kernel-by-kernel profile of one reconstruction iteration and one GAC meta step, per unit kind.

The google/ddpm-cifar10-32 architecture (random weights), the CIFAR-10 calibration protocol (5,120
tuples), W4A8 under tfmq_compat, batch 32, through ``gaq.calibrate`` with the unit filter: each
profiled unit runs eagerly (``recon.cuda_graph off``, so every kernel is visible to the profiler; the
graphed runs of ``bench/speed_cifar.py`` replay the same kernels without the launch gaps), and
``torch.profiler`` records Lightning steps ``--skip`` to ``--skip + --steps`` of the unit (after
cuDNN's autotuning). Kernels are put into classes by name (convolution, GEMM, normalisation,
elementwise, reduction, indexing/copy, optimizer) and the precision cuDNN / cuBLAS chose is read from
the kernel names (``tf32``, ``f32`` without tensor cores, ``bf16``).

    python bench/profile_unit.py --out bench/results/speed_cifar/profile_h200.md

Writes a markdown breakdown and a JSON beside it.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from diffusers import DDPMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).parent))
from speed_cifar import CIFAR_UNET  # noqa: E402

from gaq.calib.api import CalibrationConfig, calibrate  # noqa: E402
from gaq.calib.gac import GACConfig  # noqa: E402
from gaq.calib.gac_driver import DiagnosticsConfig  # noqa: E402
from gaq.calib.recon import ReconConfig  # noqa: E402
from gaq.data.calibset import CalibSetConfig, generate_calibration_set  # noqa: E402
from gaq.data.datamodule import SplitConfig  # noqa: E402
from gaq.models.loading import Denoiser  # noqa: E402
from gaq.provenance import device_name, git_commit  # noqa: E402
from gaq.quant import QuantConfig  # noqa: E402

# kernel class by name, first match wins (names of cuDNN / cuBLAS / CUTLASS / PyTorch kernels on Hopper)
CLASSES = [
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("gemm", r"gemm|cublas|cutlass|xmma|nvjet|sm90_"),
    ("normalisation", r"norm|welford"),
    ("optimizer", r"adam|multi_tensor"),
    ("reduction", r"reduce|sum_|mean_"),
    ("indexing / copy", r"index|gather|scatter|copy|cat|memcpy|memset|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, pat in CLASSES if re.search(pat, low)), "other")


def is_annotation(name: str) -> bool:
    """A ``record_function`` range on the GPU timeline (``Optimizer.step#Adam.step``), not a kernel: it
    would count its kernels twice. (Kernel names hold ``#`` only inside template arguments.)"""
    return name.startswith("ProfilerStep") or ("#" in name and "<" not in name and "(" not in name)


def precision_of(name: str) -> str:
    low = name.lower()
    for token in ("tf32", "bf16", "f16", "fp16", "s8", "i8"):
        if token in low:
            return token
    return "f32" if kernel_class(name) in ("convolution", "gemm") else "-"


class ProfileSteps(pl.Callback):
    """``torch.profiler`` over Lightning steps ``skip .. skip + steps - 1`` of every unit; counts the work done."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps = skip, steps
        self.results: dict[str, dict] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.skip:
            torch.cuda.synchronize()
            self._work = (module.meta_done, module.iters_done)
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA])
            self._prof.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx != self.skip + self.steps - 1:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        metas, iters = module.meta_done - self._work[0], module.iters_done - self._work[1]
        work = metas or iters
        kernels = []
        for e in self._prof.key_averages():
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0.0)
            if t and not is_annotation(e.key) and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                kernels.append({"name": e.key, "class": kernel_class(e.key), "precision": precision_of(e.key),
                                "us_per_work": t / work, "calls_per_work": e.count / work})
        kernels.sort(key=lambda k: -k["us_per_work"])
        self.results[module.unit_name] = {"phase": "meta step" if metas else "iteration", "work": work,
                                          "wall_ms_per_work": 1e3 * wall / work, "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/speed_cifar/profile.md")
    ap.add_argument("--units", nargs="+", default=["time_embedding", "down_blocks.0.resnets.0",
                                                    "down_blocks.1.attentions.0"])
    ap.add_argument("--methods", nargs="+", default=["uniform", "gac"])
    ap.add_argument("--skip", type=int, default=2, help="Lightning steps before the profile (autotuning)")
    ap.add_argument("--steps", type=int, default=2, help="Lightning steps profiled (10 iterations or meta steps each)")
    ap.add_argument("--samples_per_step", type=int, default=256)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = UNet2DModel(**CIFAR_UNET).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    den = Denoiser(model, sched.alphas_cumprod, (3, 32, 32), "none", source="ddpm-cifar10-32 architecture, random weights")
    calib = generate_calibration_set(den, CalibSetConfig(steps=100, spacing="quadratic", interval=5,
                                                         samples_per_step=args.samples_per_step, clip_sample=False,
                                                         batch_size=256), device, progress=False)
    k = 10
    work = (args.skip + args.steps + 1) * k
    results = {"device": device_name(device), "torch": torch.__version__, "git_commit": git_commit(),
               "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
               "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
               "command": "python bench/profile_unit.py " + " ".join(sys.argv[1:]), "runs": {}}
    for method in args.methods:
        prof = ProfileSteps(args.skip if method == "uniform" else 1, args.steps)
        recon = ReconConfig(iters=work, batch_size=32, ckpt_every=0, cache_batch=256, iters_per_step=k, cuda_graph="off")
        gac = GACConfig(meta_iters=work) if method == "gac" else GACConfig()
        cfg = CalibrationConfig(method=method, quant=QuantConfig(w_bits=4, a_bits=8), recon=recon, gac=gac,
                                diagnostics=DiagnosticsConfig(enabled=False), split=SplitConfig(), units=args.units)
        run_dir = Path(f"/tmp/gaq_profile_{method}")
        shutil.rmtree(run_dir, ignore_errors=True)
        calibrate(den, cfg, calib, run_dir=run_dir,
                  trainer={"accelerator": "gpu", "devices": 1, "enable_progress_bar": False, "callbacks": [prof]})
        results["runs"][method] = prof.results
        print(method, {u: round(r["wall_ms_per_work"], 3) for u, r in prof.results.items()}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.write_text(render(results, args.top))


def rerender(json_path: str, top: int = 12) -> None:
    """Write the markdown of a profile JSON again (``python -c 'import profile_unit; profile_unit.rerender(...)'``)."""
    path = Path(json_path)
    path.with_suffix(".md").write_text(render(json.loads(path.read_text()), top))


def render(results: dict, top: int) -> str:
    lines = [f"# Kernel profile of one iteration / meta step per unit, {results['device']}, torch {results['torch']}, "
             f"commit {results['git_commit']}", "", f"`{results['command']}`", "",
             "Eager (no CUDA graph: every kernel visible), W4A8 tfmq_compat, batch 32, paper validation split "
             "(5% of 5,120 tuples, 5 groups). cuDNN TF32 "
             f"{'on' if results['cudnn_allow_tf32'] else 'off'}, matmul TF32 "
             f"{'on' if results['matmul_allow_tf32'] else 'off'} (PyTorch's defaults). GPU time is the sum of "
             "kernel times per iteration (or meta step); wall time includes the launch gaps a CUDA graph removes.", ""]
    for method, units in results["runs"].items():
        for unit, r in units.items():
            r = {**r, "kernels": [k for k in r["kernels"] if not is_annotation(k["name"])]}
            gpu = sum(k["us_per_work"] for k in r["kernels"]) / 1e3
            lines += [f"## {method}: {unit}, one {r['phase']} ({r['work']} profiled)", "",
                      f"wall {r['wall_ms_per_work']:.3f} ms, GPU kernels {gpu:.3f} ms, "
                      f"{sum(k['calls_per_work'] for k in r['kernels']):.0f} kernel launches", "",
                      "| class | ms | share |", "|---|---|---|"]
            by_class: dict[str, float] = {}
            for k in r["kernels"]:
                by_class[k["class"]] = by_class.get(k["class"], 0.0) + k["us_per_work"] / 1e3
            for c, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {c} | {ms:.3f} | {ms / max(gpu, 1e-12):.0%} |")
            lines += ["", "| kernel | class | precision | calls | us |", "|---|---|---|---|---|"]
            for k in r["kernels"][:top]:
                name = k["name"].replace("|", "/")
                name = name if len(name) <= 90 else name[:87] + "..."
                lines.append(f"| `{name}` | {k['class']} | {k['precision']} | {k['calls_per_work']:.1f} | "
                             f"{k['us_per_work']:.1f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
