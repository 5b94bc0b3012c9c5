"""GPU check and timing of the deployed model's fused kernels at DiT-XL/2's shapes (batch 64 by default).

- quantized attention in one kernel (:func:`gaq.deploy.triton_attention.attention`, int8 operand codes, per-sample
  grids) against the explicit form (the fake quantizer's arithmetic in float32 on the same codes: dequantize,
  scores, softmax, quantize P, P @ V; eager torch ops), output in bfloat16 and float32;
- the feed-forward block's first GEMM with GELU (tanh form) and the second layer's input quantization in its
  epilogue (:func:`gaq.deploy.triton_kernels.linear_codes`) against the unfused path (GEMM to bfloat16, GELU,
  one-pass quantization), for 4-bit and 8-bit weights: the codes' agreement and each path's time, and the GEMM
  alone (to bfloat16).

Times are the median of ``--reps`` CUDA-event timings of eager calls after warm-up.

    python bench/deploy_fused.py --out bench/results/deploy/h200_fused_kernels.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gaq.deploy import triton_attention, triton_kernels, triton_quant  # noqa: E402
from gaq.provenance import device_name, git_commit  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event timings (after three warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def explicit_attention(codes, grids, scale, out_dtype):
    """The fake-quantized attention's arithmetic in float32 on the operand codes ``a = c - 128``."""
    b, h, _, d = codes[0].shape
    g = [grids[:, i].view(-1, 1, 1, 1) for i in range(8)]
    qh, kh, vh = ((a.float() + g[2 * i + 1]) * g[2 * i] for i, a in enumerate(codes))  # (a + offset - z) * s
    probs = (qh @ kh.transpose(-1, -2) * scale).softmax(-1)
    p = (torch.clamp(torch.round(probs / g[6]) + g[7], 0, 255) - g[7]) * g[6]
    return (p @ vh).transpose(1, 2).reshape(b, -1, h * d).to(out_dtype)


def attention_check(args, dev) -> dict:
    b, h, lq, d = args.batch, args.heads, args.tokens, args.head_dim
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(b, lq, 3, h, d, device=dev, generator=gen)  # the projections' layout
    cols = []
    codes = []
    for i in range(3):
        x = qkv[:, :, i]
        lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
        s = (hi - lo) / 255
        z = torch.round(-lo / s)
        codes.append(triton_quant.quantize_codes(x.contiguous(), s, z, 0, 255, 128).transpose(1, 2))
        cols += [s, 128 - z]
    cols += [torch.full((b,), 0.5 / 255, device=dev), torch.zeros(b, device=dev)]
    grids = torch.stack(cols, dim=1).float()
    scale = d ** -0.5
    ref = explicit_attention(codes, grids, scale, torch.float32)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        got = triton_attention.attention(*codes, grids, scale, (0, 255), dtype)
        out[str(dtype).split(".")[-1]] = {
            "rel_l2_vs_explicit_fp32": float((got.float() - ref).norm() / ref.norm()),
            "max_abs": float((got.float() - ref).abs().max()),
            "fused_ms": timed(lambda: triton_attention.attention(*codes, grids, scale, (0, 255), dtype), args.reps),
            "explicit_ms": timed(lambda: explicit_attention(codes, grids, scale, dtype), args.reps),
            "tuned_config": str(triton_attention._attention_tuned.best_config)}
    return out


def feedforward_check(args, dev) -> dict:
    m, k, n = args.batch * args.tokens, args.width, 4 * args.width
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(m, k, device=dev, generator=gen)
    rows = args.tokens
    s_x = torch.full((args.batch,), 8.0 / 255, device=dev)
    z_x = torch.full((args.batch,), 128.0, device=dev)
    a, _ = triton_quant.quantize_rows(x, s_x, z_x, rows, 0, 255, 128)
    row_zero = (z_x - 128).to(torch.int32)
    s_o = torch.full((args.batch,), 4.0 / 255, device=dev)  # GELU output grid: [-0.17 .. 3.8]
    z_o = torch.full((args.batch,), 11.0, device=dev)
    bias = torch.randn(n, device=dev, generator=gen) * 0.1
    out = {}
    for bits in (4, 8):
        lo = -(2 ** (bits - 1))
        b = torch.randint(lo, -lo, (n, k), device=dev, dtype=torch.int8, generator=gen)
        zw = torch.randint(-1, 2, (n,), device=dev, dtype=torch.int32, generator=gen)
        sw = torch.rand(n, device=dev, generator=gen) * 0.02 / 2 ** (bits - 4) / k ** 0.5 * 16
        w = triton_kernels.gemm_weights(b, bits, sw, zw)
        w = triton_kernels.unpacked(w) if bits == 4 else w
        rowsum = None if w.zero_free else a.sum(dim=1, dtype=torch.int32)

        def unfused():
            y = triton_kernels.linear(a, w, bias, rows, (s_x, row_zero), torch.bfloat16, rowsum)
            return triton_quant.quantize_rows(F.gelu(y, approximate="tanh"), s_o, z_o, rows, 0, 255, 128)[0]

        def fused():
            return triton_kernels.linear_codes(a, w, bias, rows, (s_x, row_zero), "gelu_tanh",
                                               (s_o, z_o, 0, 255, 128), False, rowsum)[0]

        y32 = triton_kernels.linear(a, w, bias, rows, (s_x, row_zero), torch.float32, rowsum)
        ref = triton_quant.quantize_rows(F.gelu(y32, approximate="tanh"), s_o, z_o, rows, 0, 255, 128)[0]
        got, bf = fused(), unfused()
        out[f"w{bits}"] = {
            "codes_equal_to_fp32_path": float((got == ref).float().mean()),
            "max_code_diff_fp32_path": int((got.int() - ref.int()).abs().max()),
            "codes_equal_unfused_bf16": float((bf == ref).float().mean()),
            "fused_ms": timed(fused, args.reps), "unfused_ms": timed(unfused, args.reps),
            "gemm_only_ms": timed(lambda: triton_kernels.linear(a, w, bias, rows, (s_x, row_zero), torch.bfloat16,
                                                                rowsum), args.reps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/deploy/fused_kernels.json"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head_dim", type=int, default=72)
    ap.add_argument("--width", type=int, default=1152)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    res = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "device": device_name(dev),
           "torch": torch.__version__, "shapes": vars(args) | {"out": str(args.out)},
           "attention": attention_check(args, dev),
           "attention_two_pass": attention_check(argparse.Namespace(**{**vars(args), "batch": 8, "tokens": 1024}), dev),
           "feedforward": feedforward_check(args, dev)}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
