"""gaq's Triton kernels on the GPU: exactness against the integer reference, and speed against torch's GEMMs.

Part 1, exactness (every run): for linear and 3x3 / 1x1 conv shapes with odd sizes, the int8-activation
kernels (W4 and W8 codes) must equal :mod:`gaq.deploy.kernels`' float64 reference and epilogue bit for bit;
the weight-only kernels (bf16 input, W4 codes) are compared with ``F.linear`` / ``F.conv2d`` of the
dequantized weights in float32 (relative L2 and max error are reported; bf16 rounding of the input and
weights bounds them).

Part 2, speed: one GEMM of each kind at the shapes of the paper models' hot layers (DiT-XL/2 at batch 64:
16,384 tokens of width 1,152; a CIFAR-10 UNet 3x3 conv at batch 32; an LSUN LDM-4 3x3 conv at batch 16),
median of ``triton.testing.do_bench``:

- ``triton_w4a8`` / ``triton_w8a8``: as the deployed layers run them: the int8 codes of the bf16 input by
  ``triton_quant.quantize_codes``, then gaq's GEMM kernel on them (W8 with zero points: and the row sums of
  the codes, one reduction); ``gemm_*``: the GEMM kernel alone on codes already quantized;
- ``unpack+gemm_w4a8``: the 4-bit codes unpacked per call to int8 with the zero point subtracted
  (``triton_kernels.unpacked``, as ``deploy.int4_unpack: per_call``), then the int8 kernel (no zero-point
  corrections but the rank-1 one), against unpacking in the kernel's registers;
- ``triton_w4a16``: gaq's weight-only kernel (bf16 input, W4 codes dequantized in registers);
- ``int_mm``: ``torch._int_mm`` (cuBLAS) alone on the codes (for convs on an already-built im2col matrix),
  no epilogue: the integer GEMM's ceiling; ``quant+int_mm``: with the quantization pass;
- ``bf16``: ``F.linear`` / channels-last ``F.conv2d`` in bfloat16 (cuBLAS / cuDNN).

Rates are ops / time with ops = 2*M*N*K. The roofline columns use the H200 datasheet (NVIDIA: 1,979 dense
INT8 TOP/s, 989 dense BF16 TFLOP/s, 4.8 TB/s HBM3e) and the bytes the kernel must move (input, stored codes,
output once each).

    python bench/deploy_kernels.py --out bench/results/deploy/kernels_h200     # on one H200
    TRITON_INTERPRET=1 python bench/deploy_kernels.py --device cpu --quick --out /tmp/kernels  # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gaq.deploy import kernels, triton_kernels, triton_quant
from gaq.deploy.layers import im2col
from gaq.provenance import device_name, git_commit

PEAK = {"int8": 1979e12, "bf16": 989e12, "hbm": 4.8e12}  # H200 SXM datasheet, dense


def _grid(batch, dev, g):
    """A per-sample uint8 input grid: (scale, zero, row zero)."""
    scale = torch.rand(batch, device=dev, generator=g) * 0.05 + 0.01
    zero = torch.randint(100, 156, (batch,), device=dev, generator=g).float()
    return scale, zero, (zero - 128).to(torch.int32)


def _weights(n, k, bits, dev, g):
    """Signed codes b, the kernels' weight form, scale and integer zero point per output channel."""
    b = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (n, k), dtype=torch.int8, device=dev, generator=g)
    zw = torch.randint(-2, 3, (n,), dtype=torch.int32, device=dev, generator=g)
    sw = torch.rand(n, device=dev, generator=g) * 0.1
    return b, triton_kernels.gemm_weights(b, bits, sw, zw), sw, zw


def _codes(x, act):
    return triton_quant.quantize_codes(x, act[0], act[1], 0, 255, 128)


def _rows_gemm(x, act, per, w):
    """A linear layer's int8 path as DeployedLinear runs it: the codes of the rows in one pass (with their row
    sums where the weights have zero points), then the GEMM."""
    a, rowsum = triton_quant.quantize_rows(x, act[0], act[1], per, 0, 255, 128, rowsum=not w.zero_free)
    return triton_kernels.linear(a, w, None, per, (act[0], act[2]), torch.bfloat16, rowsum)


def _err(y, ref):
    y, ref = y.float(), ref.float()
    return {"rel_l2": float((y - ref).norm() / ref.norm()), "max_abs": float((y - ref).abs().max())}


def exactness(dev, quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    # Triton's interpreter multiplies bf16 tiles wrongly (errors of 1e10 measured with triton 3.9 on the CPU;
    # its float32 products are exact): the weight-only check of a CPU smoke run uses a float32 input
    wo_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for bits in (4, 8):
        linears = [(2, 5, 37, 33)] if quick else [(3, 77, 1152, 200), (2, 5, 37, 33), (4, 256, 4608, 1152)]
        for batch, per, k, n in linears:
            x = torch.randn(batch * per, k, device=dev, generator=g).to(torch.bfloat16)
            b, w, sw, zw = _weights(n, k, bits, dev, g)
            act = _grid(batch, dev, g)
            bias = torch.randn(n, device=dev, generator=g)
            a = kernels.activation_codes(x.reshape(batch, -1), *act[:2], 0, 255, 128).reshape(-1, k)
            y = triton_kernels.linear(a, w, bias, per, (act[0], act[2]), torch.float32)
            acc = kernels.linear_reference(a, b, kernels.per_row(act[2], per), zw)
            ref = kernels.epilogue(acc.to(torch.int32), kernels.per_row(act[0], per), sw, bias, torch.float32)
            row = {"kind": "linear", "bits": bits, "M": batch * per, "K": k, "N": n,
                   "integer_mismatches": int((y != ref).sum()), "elements": y.numel()}
            flat = triton_kernels.unpacked(w) if bits == 4 else w  # the TMA kernel reads int8 codes
            y = triton_kernels.linear(a, flat, bias, per, (act[0], act[2]), torch.float32, tma=True)
            row["tma_integer_mismatches"] = int((y != ref).sum())
            if bits == 4:
                yw = triton_kernels.linear(x.to(wo_dtype), w, bias, per, None, torch.float32)
                w_ref = ((b.float() - zw[:, None].float()) * sw[:, None]).to(wo_dtype).float()
                row["weight_only_bf16"] = _err(yw, F.linear(x.float(), w_ref, bias))
            rows.append(row)
        convs = [(2, 128, 16, 96, 3, 1, 1), (2, 64, 15, 64, 3, 2, 1), (3, 96, 8, 40, 1, 1, 0), (2, 5, 9, 16, 3, 1, 1)]
        for batch, c, h, n, ks, st, pad in convs[-1:] if quick else convs:
            x = torch.randn(batch, c, h, h, device=dev, generator=g).to(torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last)
            b, w, sw, zw = _weights(n, ks * ks * c, bits, dev, g)
            act = _grid(batch, dev, g)
            bias = torch.randn(n, device=dev, generator=g)
            geo = ((ks, ks), (st, st), (pad, pad))
            a = kernels.activation_codes(x, *act[:2], 0, 255, 128)
            y = triton_kernels.conv2d(a, w, *geo, bias, (act[0], act[2]), torch.float32)
            acc = kernels.conv2d_reference(a, b, *geo, act[2], zw)
            ho, wo = acc.shape[2:]
            ref = kernels.epilogue(acc.permute(0, 2, 3, 1).reshape(-1, n).to(torch.int32),
                                   kernels.per_row(act[0], ho * wo), sw, bias, torch.float32)
            ref = ref.reshape(batch, ho, wo, n).permute(0, 3, 1, 2)
            row = {"kind": f"conv{ks}x{ks}/s{st}", "bits": bits, "C": c, "HW": h, "N": n,
                   "integer_mismatches": int((y != ref).sum()), "elements": y.numel()}
            if bits == 4:
                yw = triton_kernels.conv2d(x.to(wo_dtype), w, *geo, bias, None, torch.float32)
                w_ref = ((b.float() - zw[:, None].float()) * sw[:, None]).to(wo_dtype).float()
                w_ref = w_ref.reshape(n, ks, ks, c).permute(0, 3, 1, 2)
                row["weight_only_bf16"] = _err(yw, F.conv2d(x.float(), w_ref, bias, st, pad))
            rows.append(row)
    return rows


#: (name, kind, batch, rows or (C, H), K or kernel size, N)
SHAPES = [
    ("dit_qkv", "linear", 64, 256, 1152, 3456), ("dit_proj", "linear", 64, 256, 1152, 1152),
    ("dit_fc1", "linear", 64, 256, 1152, 4608), ("dit_fc2", "linear", 64, 256, 4608, 1152),
    ("cifar_conv3x3_b32", "conv", 32, (128, 32), 3, 128), ("ldm4_conv3x3_b16", "conv", 16, (224, 64), 3, 224),
    ("ldm4_conv1x1_b16", "conv", 16, (448, 32), 1, 448),
]


def speed(dev, reps_ms: int) -> list[dict]:
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")

    rows = []
    g = torch.Generator(device=dev).manual_seed(1)
    for name, kind, batch, geo, k_or_ks, n in SHAPES:
        if kind == "linear":
            per, k = geo, k_or_ks
            m = batch * per
            x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
        else:
            (c, hw), ks = geo, k_or_ks
            k, m = ks * ks * c, batch * hw * hw
            x = torch.randn(batch, c, hw, hw, device=dev, generator=g).to(torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last)
        act = _grid(batch, dev, g)
        grid = (act[0], act[2])
        row = {"shape": name, "M": m, "K": k, "N": n}
        times = {}
        for bits in (4, 8):
            b, w, sw, zw = _weights(n, k, bits, dev, g)
            if kind == "linear":
                xs = x.view(batch, per, k)
                a = _codes(xs, act).view(m, k)
                # as DeployedLinear runs them: the codes in one pass, then the GEMM (W8: and the row sums)
                times[f"triton_w{bits}a8"] = bench(lambda: _rows_gemm(x, act, per, w))
                times[f"gemm_w{bits}a8"] = bench(lambda: triton_kernels.linear(a, w, None, per, grid, torch.bfloat16))
                if bits == 4:
                    times["triton_w4a16"] = bench(lambda: triton_kernels.linear(x, w, None, per, None, torch.bfloat16))
                    # as deploy.int4_unpack: per_call: the 4-bit codes unpacked per call to int8 (zero point
                    # folded, one pass) and the int8 kernel without row sums
                    times["unpack+gemm_w4a8"] = bench(lambda: triton_kernels.linear(
                        a, triton_kernels.unpacked(w), None, per, grid, torch.bfloat16))
                    times["unpack+gemm_w4a8_tma"] = bench(lambda: triton_kernels.linear(
                        a, triton_kernels.unpacked(w), None, per, grid, torch.bfloat16, tma=True))
                if bits == 8:
                    times["gemm_w8a8_tma"] = bench(lambda: triton_kernels.linear(a, w, None, per, grid, torch.bfloat16,
                                                                                 tma=True))
                    bt = b.T  # column-major second operand, as torch._int_mm wants it
                    times["int_mm"] = bench(lambda: torch._int_mm(a, bt))
                    times["quant+int_mm"] = bench(lambda: torch._int_mm(_codes(xs, act).view(m, k), bt))
                    times["bf16"] = bench(lambda w16=b.to(torch.bfloat16): F.linear(x, w16))
            else:
                geom = ((ks, ks), (1, 1), (ks // 2, ks // 2))
                a = _codes(x, act)
                times[f"triton_w{bits}a8"] = bench(lambda: triton_kernels.conv2d(  # as DeployedConv2d
                    _codes(x, act), w, *geom, None, grid, torch.bfloat16))
                times[f"gemm_w{bits}a8"] = bench(lambda: triton_kernels.conv2d(a, w, *geom, None, grid, torch.bfloat16))
                if bits == 4:
                    times["triton_w4a16"] = bench(lambda: triton_kernels.conv2d(x, w, *geom, None, None, torch.bfloat16))
                if bits == 8:
                    cols, _ = im2col(a, *geom, act[2])
                    bt = b.T
                    times["int_mm"] = bench(lambda: torch._int_mm(cols, bt))
                    times["quant+int_mm"] = times["int_mm"] + bench(lambda: _codes(x, act))
                    w16 = b.to(torch.bfloat16).reshape(n, ks, ks, c).permute(0, 3, 1, 2).contiguous(
                        memory_format=torch.channels_last)
                    times["bf16"] = bench(lambda: F.conv2d(x, w16, None, 1, ks // 2))
        ops = 2 * m * n * k
        for variant, ms in times.items():
            w_bytes = n * k // 2 if "w4" in variant else n * k * (2 if variant == "bf16" else 1)
            x_bytes = m * k * (1 if variant.startswith(("gemm", "unpack", "int_mm")) else 2)
            moved = x_bytes + w_bytes + 2 * m * n
            peak = PEAK["bf16"] if variant in ("bf16", "triton_w4a16") else PEAK["int8"]
            ideal = max(ops / peak, moved / PEAK["hbm"])
            row[variant] = {"ms": round(ms, 4), "tops": round(ops / ms / 1e9, 1),
                            "roofline_ms": round(1e3 * ideal, 4), "of_roofline": round(1e3 * ideal / ms, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# gaq Triton kernels on {result['device']} (commit {result['commit']})", "",
             f"`{result['command']}`", "", "## Exactness", "",
             "| kernel | bits | shape | int8-activation mismatches | weight-only bf16 rel L2 / max abs |",
             "|---|---|---|---|---|"]
    for r in result["exactness"]:
        shape = f"M {r['M']} K {r['K']} N {r['N']}" if r["kind"] == "linear" else f"C {r['C']} HW {r['HW']} N {r['N']}"
        wo = r.get("weight_only_bf16")
        wo = f"{wo['rel_l2']:.2e} / {wo['max_abs']:.2e}" if wo else "-"
        mismatches = r["integer_mismatches"] if "tma_integer_mismatches" not in r else \
            f"{r['integer_mismatches']} (TMA kernel {r['tma_integer_mismatches']})"
        lines.append(f"| {r['kind']} | W{r['bits']} | {shape} | {mismatches} of {r['elements']} | {wo} |")
    variants = ["triton_w4a8", "triton_w8a8", "gemm_w4a8", "gemm_w8a8", "gemm_w8a8_tma", "unpack+gemm_w4a8",
                "unpack+gemm_w4a8_tma", "triton_w4a16", "int_mm", "quant+int_mm", "bf16"]
    lines += ["", "## Speed (ms, median; TOP/s; share of the roofline)", "",
              "| shape | M | K | N | " + " | ".join(variants) + " |", "|---" * (4 + len(variants)) + "|"]
    for r in result["speed"]:
        cells = [f"{r[v]['ms']:.3f} ({r[v]['tops']:.0f}, {r[v]['of_roofline']:.0%})" if v in r else "-" for v in variants]
        lines.append(f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rep_ms", type=int, default=100, help="milliseconds of timed repetitions per kernel")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small exactness shapes only, no speed (a CPU smoke run "
                   "under TRITON_INTERPRET=1)")
    p.add_argument("--no_speed", action="store_true", help="the exactness checks only (full shapes)")
    p.add_argument("--out", type=Path, default=Path("bench/results/deploy/kernels_h200"))
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    result = {"device": device_name(dev), "commit": git_commit(), "command": "python " + " ".join(sys.argv)}
    result["speed"] = [] if args.quick or args.no_speed else speed(dev, args.rep_ms)  # first: what a short device session needs most
    result["exactness"] = exactness(dev, args.quick)
    print(json.dumps(result["exactness"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
