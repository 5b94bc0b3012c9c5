"""Deployed quantized models against FP and fake-quantized ones: latency, trajectory time, memory.

For the paper architectures (``bench/paper_archs.py``, random weights: speed and agreement only), at each
batch size, per variant:

- ``fp32``: the FP model in float32 (TF32 off for matmuls and convolutions: plain fp32);
- ``bf16``: the FP model in bfloat16, channels-last for UNets;
- ``bf16_compile``: that, through ``torch.compile`` with its defaults (static shapes for the first batch size,
  then one recompile with a dynamic batch dimension for the others: run ``--batches 64 1 16 256`` to give
  batch 64 the static code);
- ``fake_w4a8``: gaq's fake-quantized W4A8 model (the reference; float32, TF32 off), the paper config's
  preset, round-to-nearest weights, per-step activation ranges calibrated on a few random batches;
- ``deploy_w4a32`` / ``deploy_w8a8`` / ``deploy_w4a8``: :func:`gaq.deploy.deploy` of the W4A32 / W8A8 /
  W4A8 model in bfloat16 with the default kernels (Triton on CUDA); ``*_intmm``: with ``torch._int_mm``
  and an int8 im2col instead; ``*_inkernel``: 4-bit codes unpacked in the GEMM's registers
  (``int4_unpack: in_kernel``) instead of once per call (the default, ``per_call``; before 2026-12-03 the default
  was ``in_kernel`` and the per-call variant was named ``*_unpacked``); ``*_fused``: the one-kernel quantized
  attention (``attention_kernel: triton``) and the feed-forward GELU in the first GEMM's epilogue
  (``fuse_feedforward``), both off by default; ``*_pointer``: the linear kernel's per-thread loads instead of
  the default TMA descriptors (``gemm_loads: pointer``; before 2026-12-04 the pointer kernel was the only one, and the
  session's runs named the TMA variants ``*_tma``); ``*_unfusednorms``: a DiT block's norms as diffusers computes them,
  each layer quantizing its own input (``fuse_norms: false``; before 2026-12-04 the only way), instead of one kernel per
  norm writing its consumers' codes; ``*_ffepilogue``: the feed-forward GELU in the first GEMM's epilogue alone
  (``fuse_feedforward``); ``*_compile``: the deployed model through ``torch.compile`` (which fuses the
  activation quantization and the attention operands' fake quantization into the ops around them; gaq's
  Triton GEMMs stay whole, as custom operators).

Memory: ``resident`` is the bytes of the variant's own tensors; ``peak`` is that plus the most its calls
allocated on top (other variants' models, kept on the host meanwhile, do not count). For deployed models
``weights`` compares the quantized layers' stored codes and grids with those layers' bf16 weights.

Measured: one model call (median of CUDA-event timings after warm-up) at a mid-trajectory timestep; a
DDIM trajectory of ``--steps`` steps (one timed run); resident bytes of the model's tensors; peak
allocated memory during the calls. Agreement: the deployed models' noise prediction against the
fake-quantized model of the same bits on the same input (relative L2), and the PSNR of their
trajectory samples from the same noise.

    python bench/deploy.py --out bench/results/deploy/h200          # on one H200
    python bench/deploy.py --device cpu --quick --archs cifar10-ddpm --batches 2 --out /tmp/deploy  # smoke
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from paper_archs import build_paper_denoiser, paper_model  # noqa: E402

from gaq.deploy import DeployConfig, deploy  # noqa: E402
from gaq.provenance import device_name, git_commit  # noqa: E402
from gaq.quant import QuantConfig, WeightRangeConfig, calibrate_activations, quantize  # noqa: E402

ARCHS = ("imagenet-dit-xl2", "lsun-bedrooms-ldm4", "cifar10-ddpm")
#: the paper configs' presets (configs/paper/*.yaml); before 2026-12-04 the bench ran DiT-XL/2 under qdiff_compat
#: (attention operands quantized, so explicit attention) while its paper config says tfmq_compat: ``--preset``
#: reproduces those runs
PRESETS = {"cifar10-ddpm": "tfmq_compat", "lsun-bedrooms-ldm4": "tfmq_compat", "imagenet-dit-xl2": "tfmq_compat"}
VARIANTS = ("fp32", "bf16", "bf16_compile", "fake_w4a8", "deploy_w4a32", "deploy_w8a8", "deploy_w4a8")
EXTRA_VARIANTS = ("deploy_w8a8_intmm", "deploy_w4a8_intmm", "deploy_w4a32_compile", "deploy_w8a8_compile",
                  "deploy_w4a8_compile", "deploy_w4a8_inkernel", "deploy_w4a8_inkernel_compile", "deploy_w4a8_fused",
                  "deploy_w4a8_fused_compile", "deploy_w8a8_fused_compile", "deploy_w4a8_pointer_compile",
                  "deploy_w8a8_pointer_compile", "deploy_w4a8_unfusednorms_compile", "deploy_w8a8_unfusednorms_compile",
                  "deploy_w4a8_ffepilogue_compile", "deploy_w8a8_ffepilogue_compile")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--batches", nargs="+", type=int, default=[64, 1, 16, 256])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--preset", default=None, help="quantization preset of every architecture (default: its paper "
                   "config's, PRESETS)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the timed trajectory and of the per-step scales")
    p.add_argument("--reps", type=int, default=10, help="timed calls per configuration (fewer when a call is slow)")
    p.add_argument("--call_budget_s", type=float, default=2.0, help="timed seconds per configuration at most")
    p.add_argument("--agree_batch", type=int, default=8, help="batch of the agreement checks")
    p.add_argument("--budget_s", type=float, default=540.0, help="stop starting new configurations after this")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true", help="torch.profiler of one call per configuration: the ops "
                   "with the most host and device time and the count of host syncs, in the results")
    p.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead"],
                   help="torch.compile mode of the *_compile variants (reduce-overhead: CUDA graphs)")
    p.add_argument("--quick", action="store_true", help="the architectures at reduced width (smoke runs)")
    p.add_argument("--out", type=Path, default=Path("bench/results/deploy/h200"))
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one ``fn()`` (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model: torch.nn.Module) -> dict | None:
    """Stored bytes of a deployed model's quantized layers (codes and per-channel grids) against their bf16 weights."""
    from gaq.deploy import DeployedLayer
    layers = [m for m in model.modules() if isinstance(m, DeployedLayer)]
    if not layers:
        return None
    stored = sum(sum(t.numel() * t.element_size() for t in (p.codes, p.col_scale, p.col_zero, p.col_sum))
                 for m in layers for p in m.parts)
    bf16 = sum(2 * p.col_scale.numel() * p.k for m in layers for p in m.parts)
    return {"stored_bytes": stored, "bf16_bytes": bf16, "ratio_bf16_over_stored": round(bf16 / stored, 3)}


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Arch:
    """One architecture: its FP model, timesteps, inputs and call."""

    def __init__(self, name: str, device: torch.device, quick: bool, steps: int, preset: str | None = None):
        den, self.info = build_paper_denoiser(name, device, quick=quick, decoder=False)
        self.preset = preset or PRESETS[name]
        self.name, self.fp, self.device = name, den.model, device
        self.shape = tuple(den.sample_shape)
        self.is_unet = "UNet" in type(self.fp).__name__
        self.class_cond = paper_model(name).cond_kind == "class"
        self.scheduler = DDIMScheduler(**paper_model(name).schedule)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps.clone()
        if paper_model(name).cond_kind == "text":
            raise SystemExit(f"{name}: text-conditioned architectures are not in this bench")

    def kwargs(self, batch: int) -> dict:
        if not self.class_cond:
            return {}
        return {"class_labels": torch.arange(batch, device=self.device) % 1000}

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.is_unet:  # DiT wants one timestep per sample on the device, as DiTPipeline passes it
            t = t.reshape(1).expand(x.shape[0]).to(x.device)
        out = model(x, t, **self.kwargs(x.shape[0])).sample
        return out[:, : self.shape[0]]  # DiT predicts noise and variance: keep the noise

    def fake(self, w_bits: int, a_bits: int) -> torch.nn.Module:
        """The fake-quantized model, round-to-nearest weights, activations calibrated on random batches
        (on the host; moved to the device while it is measured)."""
        cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=self.preset, w_range=WeightRangeConfig(method="minmax"))
        q = quantize(self.fp, cfg, timesteps=self.timesteps)
        if a_bits < 32:
            g = torch.Generator(device=self.device).manual_seed(0)
            n = len(self.timesteps)
            batches = [{"x": torch.randn(n, *self.shape, device=self.device, generator=g), "t": self.timesteps.to(self.device),
                        "step": torch.arange(n, device=self.device), "cond": self.kwargs(n)} for _ in range(2)]
            with torch.no_grad():
                calibrate_activations(q, batches)
        return q.eval().to("cpu")

    def trajectory(self, model, noise: torch.Tensor, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = noise.to(dtype).contiguous(memory_format=fmt)
        sched = copy.deepcopy(self.scheduler)
        for t in sched.timesteps:
            eps = self.call(model, x, t)
            x = sched.step(eps.float(), t, x.float()).prev_sample.to(dtype).contiguous(memory_format=fmt)
        return x.float()


def build_variant(arch: Arch, variant: str, fakes: dict, compile_mode: str = "default") -> tuple[torch.nn.Module, torch.dtype]:
    """The model of ``variant`` and its input dtype."""
    if variant == "fp32":
        return arch.fp, torch.float32
    if variant.startswith("bf16"):
        m = copy.deepcopy(arch.fp).to(torch.bfloat16)
        if arch.is_unet:
            m = m.to(memory_format=torch.channels_last)
        if variant == "bf16_compile":
            m = torch.compile(m, mode=compile_mode)
        return m, torch.bfloat16
    bits = variant.split("_")[1]
    w_bits, a_bits = int(bits[1]), int(bits.split("a")[1])
    if (w_bits, a_bits) not in fakes:
        fakes[(w_bits, a_bits)] = arch.fake(w_bits, a_bits)
    fake = fakes[(w_bits, a_bits)]
    if variant.startswith("fake"):
        return fake.to(arch.device), torch.float32
    intmm = variant.endswith("_intmm")
    cfg = DeployConfig(dtype="bfloat16", linear_kernel="int_mm" if intmm else "auto",
                       conv_kernel="im2col" if intmm else "auto",
                       int4_unpack="in_kernel" if "_inkernel" in variant else "per_call",
                       attention_kernel="triton" if "_fused" in variant else "explicit",
                       fuse_feedforward="_fused" in variant or "_ffepilogue" in variant,
                       fuse_norms="_unfusednorms" not in variant, gemm_loads="pointer" if "_pointer" in variant else "auto")
    m = deploy(copy.deepcopy(fake.to(arch.device)), cfg)
    fake.to("cpu")  # the reference waits on the host until the agreement check
    if variant.endswith("_compile"):
        m = torch.compile(m, mode=compile_mode)
    return m, torch.bfloat16


def quantizer_check(dev: torch.device) -> dict:
    """Codes of the one-pass Triton activation quantizer against the torch reference on this device."""
    from gaq.deploy import triton_quant
    if dev.type != "cuda" or not triton_quant.AVAILABLE:
        return {"skipped": "no CUDA device or no triton"}
    g = torch.Generator(device=dev).manual_seed(0)
    scale = torch.rand(64, device=dev, generator=g) * 0.05 + 1e-3
    zero = torch.randint(0, 256, (64,), device=dev, generator=g).float()
    x = torch.randn(64, 128, 32, 32, device=dev, generator=g) * 2
    x[:, 0, 0, :8] = (torch.arange(8, device=dev) + 0.5) * scale[:, None]  # ties
    out = {}
    for name, xi in {"fp32": x, "bf16": x.to(torch.bfloat16),
                     "bf16_channels_last": x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)}.items():
        ref = (torch.clamp(torch.round(xi.float() / scale.view(-1, 1, 1, 1)) + zero.view(-1, 1, 1, 1), 0, 255) - 128)
        got = triton_quant.quantize_codes(xi, scale, zero, 0, 255, 128)
        out[name] = {"mismatches": int((got.float() != ref).sum()), "elements": ref.numel()}
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` over ``b``'s range."""
    mse = float(((a - b) ** 2).mean())
    peak = float(b.max() - b.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def measure(arch: Arch, variant: str, model, dtype: torch.dtype, batch: int, args) -> dict:
    dev = arch.device
    g = torch.Generator(device=dev).manual_seed(batch)
    x = torch.randn(batch, *arch.shape, device=dev, generator=g).to(dtype)
    channels_last = arch.is_unet and variant.startswith("bf16")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = arch.timesteps[len(arch.timesteps) // 2]  # a host tensor, as diffusers pipelines pass it
    row = {"arch": arch.name, "variant": variant, "batch": batch}
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    with torch.no_grad():
        t0 = time.perf_counter()
        first = timed(lambda: arch.call(model, x, t), dev)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)  # includes compilation for compiled variants
        warm = [timed(lambda: arch.call(model, x, t), dev) for _ in range(2)]
        reps = max(3, min(args.reps, int(args.call_budget_s / max(min(warm), 1e-6))))
        times = [timed(lambda: arch.call(model, x, t), dev) for _ in range(reps)]
        row["call_ms"] = round(1000 * statistics.median(times), 4)
        row["reps"] = reps
        noise = torch.randn(batch, *arch.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(7))
        row["trajectory_s"] = round(timed(lambda: arch.trajectory(model, noise, dtype, channels_last), dev), 4)
        if args.profile:
            row["profile"] = profile_call(lambda: arch.call(model, x, t), dev)
    if dev.type == "cuda":
        extra = torch.cuda.max_memory_allocated(dev) - before
        row["peak_gib"] = round((tensor_bytes(getattr(model, "_orig_mod", model)) + extra) / 2**30, 3)
    del first
    return row


#: host-side events that wait for the device or read a value back from it
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
               "cudaMemcpyAsync")


def profile_call(fn, dev: torch.device, top: int = 12) -> dict:
    """One profiled ``fn()``: wall ms, the ops with the most self host time and self device time, sync counts."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    wall = 1000 * (time.perf_counter() - t0)
    events = prof.key_averages()

    def rows(key):
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
        return [{"op": e.key[:80], "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
                 "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1000, 3)} for e in ranked]

    return {"wall_ms": round(wall, 2), "by_host": rows("self_cpu_time_total"),
            "by_device": rows("self_device_time_total") if dev.type == "cuda" else [],
            "device_ms": round(sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000, 3),
            "syncs": {e.key: e.count for e in events if e.key in SYNC_EVENTS}}


def agreement(arch: Arch, model, fake, dtype: torch.dtype, batch: int) -> dict:
    dev = arch.device
    x = torch.randn(batch, *arch.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(3))
    t = arch.timesteps[len(arch.timesteps) // 2]
    with torch.no_grad():
        ref = arch.call(fake, x, t).float()
        out = arch.call(model, x.to(dtype), t).float()
        noise = torch.randn(batch, *arch.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(11))
        s_ref = arch.trajectory(fake, noise, torch.float32)
        s_out = arch.trajectory(model, noise, dtype)
    return {"eps_rel_l2_vs_fake": round(float((out - ref).norm() / ref.norm()), 6),
            "sample_psnr_vs_fake_db": round(psnr(s_out, s_ref), 2), "agree_batch": batch}


def markdown(res: dict) -> str:
    lines = [f"# Deployed quantized models ({res['device']})", "",
             f"Command: `{res['command']}`; commit {res['commit']}; torch {res['torch']}. "
             f"Trajectory: DDIM, {res['steps']} steps. Random weights (speed and agreement only). "
             "fp32 and fake_w4a8: float32 with TF32 off; bf16 and deploy_*: bfloat16 outside the integer GEMMs.", ""]
    for arch in res["archs"]:
        info = res["archs"][arch]
        lines += [f"## {arch}: {info['description']} ({info['params'] / 1e6:.1f}M parameters)", "",
                  "| variant | resident MiB | " + " | ".join(f"b{b} call ms | b{b} traj s | b{b} peak GiB"
                                                      for b in sorted(res["batches"]))
                  + " | eps rel vs fake | sample PSNR dB |",
                  "|---|---:|" + "---:|" * (3 * len(res["batches"])) + "---:|---:|"]
        batches = sorted(res["batches"])
        for variant, v in info["variants"].items():
            if "batches" not in v:  # skipped (budget spent)
                continue
            cells = [variant, f"{v.get('resident_bytes', 0) / 2**20:.1f}"]
            for b in batches:
                r = v["batches"].get(str(b), {})
                cells += [str(r.get("call_ms", "-")), str(r.get("trajectory_s", "-")), str(r.get("peak_gib", "-"))]
            agree = v.get("agreement", {})
            cells += [str(agree.get("eps_rel_l2_vs_fake", "-")), str(agree.get("sample_psnr_vs_fake_db", "-"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(res))


def main() -> None:
    args = parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 for the float32 variants
    torch.backends.cudnn.allow_tf32 = False
    res = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "device": device_name(dev),
           "torch": torch.__version__, "steps": args.steps, "batches": args.batches, "archs": {}}
    res["quantizer_check"] = quantizer_check(dev)
    print(json.dumps({"quantizer_check": res["quantizer_check"]}), flush=True)
    start = time.perf_counter()
    for name in args.archs:
        arch = Arch(name, dev, args.quick, args.steps, args.preset)
        info = res["archs"][name] = {**arch.info, "preset": arch.preset, "variants": {}}
        fakes: dict = {}
        for variant in args.variants:
            if time.perf_counter() - start > args.budget_s:
                info["variants"][variant] = {"skipped": "budget spent"}
                continue
            t0 = time.perf_counter()
            model, dtype = build_variant(arch, variant, fakes, args.compile_mode)
            plain = getattr(model, "_orig_mod", model)
            v = info["variants"][variant] = {"build_s": round(time.perf_counter() - t0, 2),
                                             "resident_bytes": tensor_bytes(plain), "weights": weight_bytes(plain),
                                             "batches": {}}
            for batch in args.batches:
                if time.perf_counter() - start > args.budget_s:
                    break
                try:
                    v["batches"][str(batch)] = measure(arch, variant, model, dtype, batch, args)
                except torch.cuda.OutOfMemoryError:
                    v["batches"][str(batch)] = {"error": "out of memory"}
                print(json.dumps({name: {variant: v["batches"].get(str(batch))}}), flush=True)
                write(res, args.out)
            if variant.startswith("deploy"):
                bits = variant.split("_")[1]
                fake = fakes[(int(bits[1]), int(bits.split("a")[1]))].to(dev)
                v["agreement"] = agreement(arch, model, fake, dtype, args.agree_batch)
                fake.to("cpu")
                print(json.dumps({name: {variant: v["agreement"]}}), flush=True)
            if variant.startswith("fake"):
                model.to("cpu")
            del model
            write(res, args.out)
        del arch, fakes
        gc.collect()
    res["wall_s"] = round(time.perf_counter() - start, 1)
    write(res, args.out)
    print(markdown(res))


if __name__ == "__main__":
    main()
