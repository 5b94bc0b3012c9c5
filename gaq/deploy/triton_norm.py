"""A LayerNorm whose output leaves as the int8 input codes of the layers that read it (Triton).

A transformer block's norm feeds quantized linear layers (a DiT block's first norm feeds the query, key and value
projections, its second the feed-forward's first layer). Unfused, the normalized and modulated activations reach
memory in the compute dtype and each layer reads them back to quantize them. :func:`norm_codes` computes, per row
of ``x`` ``(M, C)`` (sample ``i`` owning rows ``i*rows ... (i+1)*rows-1``), in one kernel:

1. optionally the block's residual update first, ``x <- x + gate_i * branch`` (written back: the block's stream);
2. ``y = layer_norm(x) [* weight + bias]``, mean and variance in float32 over the row;
3. optionally the adaptive modulation ``y <- y * (1 + scale_i) + shift_i`` (adaLN: DiT, PixArt);
4. for each of up to :data:`MAX_CODES` consumers ``j`` the int8 codes ``clamp(round(y / s_j) + z_j, qmin_j,
   qmax_j) - offset_j`` (per-sample grids as :mod:`gaq.deploy.triton_quant`'s), and on request their row sums.

The residual stream is rounded to the compute dtype where the unfused torch ops round it (the product of the gate and
the branch, then the sum: the stream the next block reads is the same); the norm, its affine map and the modulation
stay in float32 up to the quantization (the unfused ops round each to the compute dtype: in bfloat16 the fused codes
are closer to the fake-quantized model's float32 ones). Under torch.compile the kernel is one custom operator
(``gaq::norm_codes``), so Inductor cannot fuse unrelated work into it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gaq.deploy.triton_quant import INTERPRET, per_sample_grid
from gaq.errors import check

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU installs without triton: the blocks run their unfused forward
    triton, tl, AVAILABLE = None, None, False

#: Consumers one call quantizes for (a block's query, key and value projections).
MAX_CODES = 3
#: ``(rows per program, columns per chunk, warps)`` candidates, autotuned per row width on a GPU.
NORM_SHAPES = [(4, 256, 4), (8, 128, 4), (8, 256, 8), (16, 128, 8), (2, 512, 4), (16, 64, 4)]


if AVAILABLE:
    from gaq.deploy.triton_quant import _quantize

    @triton.jit
    def _round_to(v, DTYPE: tl.constexpr):
        """``v`` (float32) rounded to the compute dtype and back, as a torch op in that dtype stores it."""
        return v.to(DTYPE).to(tl.float32)

    @triton.jit
    def _codes_out(y, c_ptr, s_ptr, z_ptr, sample, gstride, qmin, qmax, offset, rm64, rc, mask, mask_m, C):
        s = tl.load(s_ptr + sample * gstride, mask=mask_m, other=1.0)
        z = tl.load(z_ptr + sample * gstride, mask=mask_m, other=0.0)
        tl.store(c_ptr + rm64[:, None] * C + rc[None, :], _quantize(y, s[:, None], z[:, None], qmin, qmax, offset),
                 mask=mask)

    @triton.jit
    def _norm_codes_kernel(x_ptr, branch_ptr, gate_ptr, res_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr,
                           c0_ptr, s0_ptr, z0_ptr, c1_ptr, s1_ptr, z1_ptr, c2_ptr, s2_ptr, z2_ptr, sum_ptr,
                           M, C, rows, stride_x, stride_branch, stride_gate, stride_scale, stride_shift,
                           g0, g1, g2, eps, min0, max0, off0, min1, max1, off1, min2, max2, off2,
                           DTYPE: tl.constexpr, RESIDUAL: tl.constexpr, AFFINE: tl.constexpr,
                           MODULATE: tl.constexpr, OUT_Y: tl.constexpr, CODES: tl.constexpr, ROWSUM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Rows ``BLOCK_M`` per program in three passes over column chunks of ``BLOCK_C`` (no padding of a row to a
        power of two, which cost the one-tile form 44% of its arithmetic at DiT's 1,152 channels): the stream and
        the row sums, the variance about the mean, then the output and its codes."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        rm64 = rm.to(tl.int64)
        sample = rm // rows
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            mask = mask_m[:, None] & (rc[None, :] < C)
            x = tl.load(x_ptr + rm64[:, None] * stride_x + rc[None, :], mask=mask, other=0.0).to(tl.float32)
            if RESIDUAL:  # x + gate * branch, each op rounded as torch rounds it: the block's stream
                br = tl.load(branch_ptr + rm64[:, None] * stride_branch + rc[None, :], mask=mask, other=0.0)
                gate = tl.load(gate_ptr + sample[:, None] * stride_gate + rc[None, :], mask=mask, other=0.0)
                x = _round_to(_round_to(gate.to(tl.float32) * br.to(tl.float32), DTYPE) + x, DTYPE)
                tl.store(res_ptr + rm64[:, None] * C + rc[None, :], x.to(DTYPE), mask=mask)
            total += tl.sum(x, axis=1)
        if RESIDUAL:  # the stream just stored is what the next passes read: visible to the whole program
            tl.debug_barrier()
            src_ptr, stride_src = res_ptr, C
        else:
            src_ptr, stride_src = x_ptr, stride_x
        mean = total / C
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            mask = mask_m[:, None] & (rc[None, :] < C)
            x = tl.load(src_ptr + rm64[:, None] * stride_src + rc[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean[:, None], 0.0)
            total += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(total / C + eps)
        for c0 in range(0, C, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            mask_c = rc < C
            mask = mask_m[:, None] & mask_c[None, :]
            x = tl.load(src_ptr + rm64[:, None] * stride_src + rc[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if AFFINE:
                w = tl.load(w_ptr + rc, mask=mask_c, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + rc, mask=mask_c, other=0.0).to(tl.float32)
                y = y * w[None, :] + b[None, :]
            if MODULATE:  # y * (1 + scale) + shift, in float32
                sc = tl.load(scale_ptr + sample[:, None] * stride_scale + rc[None, :], mask=mask, other=0.0)
                sh = tl.load(shift_ptr + sample[:, None] * stride_shift + rc[None, :], mask=mask, other=0.0)
                y = y * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
            if OUT_Y:
                tl.store(y_ptr + rm64[:, None] * C + rc[None, :], y.to(DTYPE), mask=mask)
            if CODES > 0:
                _codes_out(y, c0_ptr, s0_ptr, z0_ptr, sample, g0, min0, max0, off0, rm64, rc, mask, mask_m, C)
            if CODES > 1:
                _codes_out(y, c1_ptr, s1_ptr, z1_ptr, sample, g1, min1, max1, off1, rm64, rc, mask, mask_m, C)
            if CODES > 2:
                _codes_out(y, c2_ptr, s2_ptr, z2_ptr, sample, g2, min2, max2, off2, rm64, rc, mask, mask_m, C)
        if ROWSUM:  # the codes just stored, summed per row (a fourth pass, only for 8-bit weights with zero points)
            tl.debug_barrier()
            for j in tl.static_range(CODES):
                c_ptr = c0_ptr if j == 0 else (c1_ptr if j == 1 else c2_ptr)
                acc = tl.zeros((BLOCK_M,), dtype=tl.int32)
                for c0 in range(0, C, BLOCK_C):
                    rc = c0 + tl.arange(0, BLOCK_C)
                    mask = mask_m[:, None] & (rc[None, :] < C)
                    q = tl.load(c_ptr + rm64[:, None] * C + rc[None, :], mask=mask, other=0)
                    acc += tl.sum(q.to(tl.int32), axis=1)
                tl.store(sum_ptr + j * M + rm, acc, mask=mask_m)

    _norm_codes_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w)
                 for m, c, w in ([(2, 32, 4)] if INTERPRET else NORM_SHAPES)],
        key=["C", "DTYPE", "RESIDUAL", "CODES"])(_norm_codes_kernel)

#: Triton's element types of the compute dtypes.
_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@torch.compiler.disable  # never traced as a frame of its own (a frame left to eager calling it): Dynamo would trace
# the launch as a user Triton kernel, whose float arguments a dynamic-shape graph types float64 (a failed compile on
# the H200); under compile it runs as the custom operator below
def _run_norm_codes(x: Tensor, branch: Tensor | None, gate: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                    scale: Tensor | None, shift: Tensor | None, rows: int, eps: float, code_scales: list[Tensor],
                    code_zeros: list[Tensor], grid_strides: list[int], code_ranges: list[float], rowsum: bool,
                    out_y: bool) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
    m, c = x.shape
    n = len(code_scales)
    res = torch.empty_like(x) if branch is not None else x.new_empty((0,))
    y = torch.empty_like(x) if out_y else x.new_empty((0,))
    codes = [torch.empty((m, c), device=x.device, dtype=torch.int8) for _ in range(n)]
    sums = torch.empty((n if rowsum else 0, m), device=x.device, dtype=torch.int32)
    if m == 0:
        return res, y, codes, sums
    slots = [(codes[j], code_scales[j], code_zeros[j]) if j < n else (x, x, x) for j in range(MAX_CODES)]
    strides = list(grid_strides) + [0] * (MAX_CODES - n)
    ranges = list(code_ranges) + [0.0] * (3 * (MAX_CODES - n))
    _norm_codes_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x, branch if branch is not None else x, gate if gate is not None else x, res if branch is not None else x,
        weight if weight is not None else x, bias if bias is not None else x, scale if scale is not None else x,
        shift if shift is not None else x, y if out_y else x, *[t for slot in slots for t in slot],
        sums if rowsum else x, m, c, rows, x.stride(0), branch.stride(0) if branch is not None else 0,
        gate.stride(0) if gate is not None else 0, scale.stride(0) if scale is not None else 0,
        shift.stride(0) if shift is not None else 0, *strides, float(eps), *ranges,
        DTYPE=getattr(tl, _TL_DTYPES[x.dtype]),
        RESIDUAL=branch is not None, AFFINE=weight is not None, MODULATE=scale is not None, OUT_Y=out_y, CODES=n,
        ROWSUM=rowsum)
    return res, y, codes, sums


if AVAILABLE:
    _norm_codes_op = torch.library.custom_op("gaq::norm_codes", _run_norm_codes, mutates_args=(), schema=(
        "(Tensor x, Tensor? branch, Tensor? gate, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int rows, "
        "float eps, Tensor[] code_scales, Tensor[] code_zeros, int[] grid_strides, float[] code_ranges, bool rowsum, "
        "bool out_y) -> (Tensor, Tensor, Tensor[], Tensor)"))
    _norm_codes_op.register_fake(lambda x, branch, gate, weight, bias, scale, shift, rows, eps, code_scales, *args: (
        torch.empty_like(x) if branch is not None else x.new_empty((0,)),
        torch.empty_like(x) if args[-1] else x.new_empty((0,)),
        [x.new_empty(x.shape, dtype=torch.int8) for _ in code_scales],
        x.new_empty((len(code_scales) if args[-2] else 0, x.shape[0]), dtype=torch.int32)))


class NormCodes(NamedTuple):
    """What :func:`norm_codes` returns."""

    stream: Tensor | None  #: the updated residual stream (None without a branch)
    y: Tensor | None  #: the normalized rows in the compute dtype (None unless asked for)
    codes: list[Tensor]  #: int8 ``(M, C)`` per consumer
    rowsums: list[Tensor | None]  #: int32 ``(M,)`` per consumer (None each without ``rowsum``)


def norm_codes(x: Tensor, rows: int, eps: float, consumers: list[tuple[Tensor, Tensor, int, int, int]], *,
               weight: Tensor | None = None, bias: Tensor | None = None, scale: Tensor | None = None,
               shift: Tensor | None = None, branch: Tensor | None = None, gate: Tensor | None = None,
               rowsum: bool = False, out_y: bool = False):
    """The LayerNorm of rows ``x`` ``(M, C)`` as its consumers' int8 codes, in one kernel (see the module docstring).

    Args:
        x: the rows in the compute dtype (float32, bfloat16 or float16), last dimension contiguous.
        rows: rows per sample (tokens).
        eps: the norm's epsilon.
        consumers: per consumer ``(scale, zero, qmin, qmax, offset)`` of its input quantizer (float32 ``(B,)`` or
            ``(1,)`` grids), at most :data:`MAX_CODES`.
        weight, bias: the norm's affine parameters ``(C,)``, or None.
        scale, shift: the per-sample modulation ``(B, C)`` (last dimension contiguous), or None.
        branch, gate: the residual update ``x + gate * branch`` applied first (``branch`` as ``x``, ``gate``
            ``(B, C)``), or None.
        rowsum: also return each consumer's int32 row sums of its codes.
        out_y: also return the normalized (and modulated) rows in the compute dtype.

    Returns:
        ``(stream, y, codes, rowsums)`` (:class:`NormCodes`).
    """
    check(AVAILABLE and (x.is_cuda or INTERPRET), "gaq's fused norm needs triton and a CUDA tensor")
    check(x.ndim == 2 and x.dtype in _TL_DTYPES, f"norm_codes takes (M, C) rows in a float dtype, got {x.dtype} "
          f"{tuple(x.shape)}")
    check(0 < len(consumers) + int(out_y) and len(consumers) <= MAX_CODES,
          f"norm_codes quantizes for 1 to {MAX_CODES} consumers, got {len(consumers)}")
    m, c = x.shape
    batch = max(1, m // max(1, rows))

    def rows_of(t: Tensor | None) -> Tensor | None:
        return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())

    x = rows_of(x)
    if weight is not None and bias is None:  # nn.LayerNorm(bias=False)
        bias = torch.zeros_like(weight)
    for name, t in (("scale", scale), ("shift", shift), ("gate", gate)):
        check(t is None or tuple(t.shape) == (batch, c), f"norm_codes' {name} must be ({batch}, {c}), got "
              f"{None if t is None else tuple(t.shape)}")
    check((branch is None) == (gate is None), "norm_codes' branch and gate come together")
    check((scale is None) == (shift is None), "norm_codes' scale and shift come together")
    scales, zeros, strides, ranges = [], [], [], []
    for s, z, qmin, qmax, offset in consumers:
        scales.append(s.float().contiguous())
        zeros.append(z.float().contiguous())
        strides.append(1 if per_sample_grid(s, batch) else 0)
        ranges += [float(qmin), float(qmax), float(offset)]
    args = (x, rows_of(branch), rows_of(gate), weight, bias, rows_of(scale), rows_of(shift), max(1, rows), float(eps),
            scales, zeros, strides, ranges, rowsum, out_y)
    run = _norm_codes_op if torch.compiler.is_compiling() else _run_norm_codes
    res, y, codes, sums = run(*args)
    return NormCodes(res if branch is not None else None, y if out_y else None, list(codes),
                     [sums[j] for j in range(len(codes))] if rowsum else [None] * len(codes))


__all__ = ["MAX_CODES", "NormCodes", "norm_codes"]
