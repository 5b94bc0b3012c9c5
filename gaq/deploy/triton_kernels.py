"""gaq's Triton kernels of deployed layers: one kernel per layer call, the input quantized in its prologue.

Two kernels, each in two modes:

- :func:`linear` (``(M, K) x (N, K)^T``) and :func:`conv2d` (implicit GEMM over a channels-last input:
  the reduction runs over ``(kh, kw, c)`` with channels fastest, as :mod:`gaq.deploy.kernels` orders the
  weight codes; no im2col buffer);
- *integer* mode (an input quantizer): the float input tile is quantized in registers with the calibrated
  per-sample step and zero point (half-to-even rounding of an IEEE-rounded division, the codes of
  :meth:`gaq.deploy.layers.DeployedActQuant.codes`), multiplied on the int8 tensor cores with the weight
  codes (4-bit codes unpacked from two per byte in registers) into an exact int32 accumulator, the
  row sums of the codes kept on the way; the epilogue applies the zero-point corrections
  ``acc = a.b - zw*rowsum(a) - zx*colsum(b) + K*zx*zw``, the scales ``s_x[m] * s_w[n]`` in float32
  and the bias, and stores the compute dtype. ``acc`` equals :func:`gaq.deploy.kernels.linear_reference`
  exactly; the output differs from the reference epilogue only by float32 rounding order (none: the
  same products in the same order);
- *weight-only* mode (the input stays FP: W4A16 / W8A16): the weight tile is dequantized
  ``(b - zw) * s_w`` in float32 and cast to the input's dtype in registers, a tensor-core GEMM in that
  dtype accumulates in float32 (IEEE float32 products for a float32 input: no TF32); only the codes are
  read from memory.

Spatial zero padding of a convolution needs nothing: a padded input of 0.0 quantizes to the row zero
``zx``, which is the padding of the codes (``a - zx = 0``), and to 0.0 in weight-only mode.

On a CUDA device the block sizes are autotuned per shape; under ``TRITON_INTERPRET=1`` (the CPU tests)
one small configuration runs. torch.compile traces the kernel launches directly.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from gaq.errors import check

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU installs without triton: gaq.deploy falls back to torch._int_mm
    triton, tl, AVAILABLE = None, None, False

#: Whether kernels run in Triton's interpreter (numpy on the CPU), as the CPU tests run them.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list:
    """Autotune candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``; one small one in the interpreter."""
    if INTERPRET:
        shapes = [(32, 32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


#: Candidates for the GEMMs of diffusion models on Hopper-class GPUs: N from 64 to 4,608, K from 27 to 4,608.
GEMM_SHAPES = [(128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
               (64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (32, 64, 64, 4, 4)]


if AVAILABLE:
    @triton.jit
    def _quantize(x, s, z, qmin, qmax, offset):
        """int8 ``clamp(round_half_even(x / s) + z, qmin, qmax) - offset`` of a float32 tile."""
        v = tl.math.div_rn(x, s)
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)
        q = tl.minimum(tl.maximum(r + z, qmin), qmax)
        return (q - offset).to(tl.int8)

    @triton.jit
    def _weight_tile(w_ptr, rn, mask_n, k0, K, stride_wn, W4: tl.constexpr, BLOCK_K: tl.constexpr):
        """int8 weight codes ``b`` ``(BLOCK_N, BLOCK_K)`` at reduction indices ``k0 ... k0 + BLOCK_K - 1`` (``k0``
        even for 4-bit); out-of-range entries are 0."""
        if W4:
            rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(w_ptr + rn[:, None] * stride_wn + rh[None, :],
                        mask=mask_n[:, None] & (rh[None, :] < (K + 1) // 2), other=136)  # 0x88: codes 0, 0
            lo = ((p & 15).to(tl.int32) - 8).to(tl.int8)
            hi = ((p >> 4).to(tl.int32) - 8).to(tl.int8)
            b = tl.interleave(lo, hi)  # the even index in the low nibble
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            b = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :],
                        mask=mask_n[:, None] & (rk[None, :] < K), other=0)
        return b

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column block of this program, grouped along M so neighbours share weight tiles in L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, sample, out_ptr, stride_om, bias_ptr, sx_ptr, zx_ptr,
                  sw_ptr, zw_ptr, cs_ptr, K, INTEGER: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Corrections, scales and bias of an accumulator tile; stores the output dtype."""
        if INTEGER:
            zx = tl.load(zx_ptr + sample, mask=mask_m, other=0)
            zw = tl.load(zw_ptr + rn, mask=mask_n, other=0)
            cs = tl.load(cs_ptr + rn, mask=mask_n, other=0)
            acc = acc - zw[None, :] * rowsum[:, None] - zx[:, None] * cs[None, :] + K * zx[:, None] * zw[None, :]
            sx = tl.load(sx_ptr + sample, mask=mask_m, other=1.0)
            sw = tl.load(sw_ptr + rn, mask=mask_n, other=1.0)
            y = acc.to(tl.float32) * (sx[:, None] * sw[None, :])
        else:
            y = acc
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _step(x, mask, s, z, w_ptr, rn, mask_n, k0, K, stride_wn, sw, zw, acc, rowsum, qmin, qmax, offset,
              W4: tl.constexpr, INTEGER: tl.constexpr, BLOCK_K: tl.constexpr):
        """One reduction step: the input tile ``x`` (``mask`` true where it is part of the reduction) times the
        weight codes from reduction index ``k0``, added to ``acc`` (and ``rowsum``)."""
        b = _weight_tile(w_ptr, rn, mask_n, k0, K, stride_wn, W4, BLOCK_K)
        if INTEGER:
            if x.dtype == tl.int8:  # codes quantized by a pass of their own (once, not once per column block)
                a = tl.where(mask, x, 0)
            else:
                a = tl.where(mask, _quantize(x.to(tl.float32), s[:, None], z[:, None], qmin, qmax, offset), 0)
            rowsum += tl.sum(a.to(tl.int32), axis=1)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            wd = ((b.to(tl.float32) - zw[:, None].to(tl.float32)) * sw[:, None]).to(x.dtype)
            if x.dtype == tl.float32:  # IEEE products for a float32 input (no TF32); bf16 / fp16 take the MMA
                acc = tl.dot(x, tl.trans(wd), acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(x, tl.trans(wd), acc, out_dtype=tl.float32)
        return acc, rowsum

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, sx_ptr, zxf_ptr, zx_ptr, sw_ptr, zw_ptr, cs_ptr,
                       M, N, K, rows, grid_stride, stride_xm, stride_wn, stride_om, qmin, qmax, offset,
                       W4: tl.constexpr, INTEGER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        sample = (rm // rows) * grid_stride  # grid_stride 0: one grid for every row
        if INTEGER:
            s = tl.load(sx_ptr + sample, mask=mask_m, other=1.0)
            z = tl.load(zxf_ptr + sample, mask=mask_m, other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            sw, zw = s, s  # unused in integer mode
        else:
            s, z = rm, rm  # unused in weight-only mode
            sw = tl.load(sw_ptr + rn, mask=mask_n, other=1.0)
            zw = tl.load(zw_ptr + rn, mask=mask_n, other=0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (rk[None, :] < K)
            x = tl.load(x_rows + rk[None, :], mask=mask, other=0)
            acc, rowsum = _step(x, mask, s, z, w_ptr, rn, mask_n, k0, K, stride_wn, sw, zw, acc, rowsum,
                                qmin, qmax, offset, W4, INTEGER, BLOCK_K)
        _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, sample, out_ptr, stride_om, bias_ptr, sx_ptr, zx_ptr,
                  sw_ptr, zw_ptr, cs_ptr, K, INTEGER, HAS_BIAS)

    @triton.jit
    def _conv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, sx_ptr, zxf_ptr, zx_ptr, sw_ptr, zw_ptr, cs_ptr,
                     M, N, K, C, H, W, HO, WO, grid_stride, stride_xb, stride_xh, stride_xw, stride_wn, stride_om,
                     SH, SW, PH, PW, qmin, qmax, offset,
                     KH: tl.constexpr, KW: tl.constexpr, W4: tl.constexpr, INTEGER: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        bi = rm // (HO * WO)
        oh = (rm % (HO * WO)) // WO
        ow = rm % WO
        sample = bi * grid_stride
        if INTEGER:
            s = tl.load(sx_ptr + sample, mask=mask_m, other=1.0)
            z = tl.load(zxf_ptr + sample, mask=mask_m, other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            sw, zw = s, s
        else:
            s, z = rm, rm
            sw = tl.load(sw_ptr + rn, mask=mask_n, other=1.0)
            zw = tl.load(zw_ptr + rn, mask=mask_n, other=0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        if INTEGER:
            zx_row = tl.load(zx_ptr + sample, mask=mask_m, other=0).to(tl.int8)
        else:
            zx_row = rm
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh * SH - PH + kh
                iw = ow * SW - PW + kw
                inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                pix = x_ptr + bi.to(tl.int64) * stride_xb + ih * stride_xh + iw * stride_xw
                for c0 in range(0, C, BLOCK_K):
                    rc = c0 + tl.arange(0, BLOCK_K)
                    in_c = rc[None, :] < C
                    x = tl.load(pix[:, None] + rc[None, :], mask=inside[:, None] & in_c, other=0)
                    if INTEGER:
                        if x.dtype == tl.int8:  # codes: a padded pixel is the code of 0.0, the row zero
                            x = tl.where(inside[:, None], x, zx_row[:, None])
                    k0 = (kh * KW + kw) * C + c0
                    acc, rowsum = _step(x, mask_m[:, None] & in_c, s, z, w_ptr, rn, mask_n, k0, K, stride_wn, sw, zw,
                                        acc, rowsum, qmin, qmax, offset, W4, INTEGER, BLOCK_K)
        _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, sample, out_ptr, stride_om, bias_ptr, sx_ptr, zx_ptr,
                  sw_ptr, zw_ptr, cs_ptr, K, INTEGER, HAS_BIAS)

    _linear_tuned = triton.autotune(_configs(GEMM_SHAPES), key=["M", "N", "K", "W4", "INTEGER"])(_linear_kernel)
    _conv_tuned = triton.autotune(_configs(GEMM_SHAPES), key=["M", "N", "K", "C", "W4", "INTEGER"])(_conv_kernel)


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _check_device(x: Tensor) -> None:
    check(AVAILABLE and (x.is_cuda or INTERPRET), "gaq's Triton kernels need triton and a CUDA tensor "
          "(or TRITON_INTERPRET=1); set deploy.linear_kernel / deploy.conv_kernel to int_mm / im2col")


def _grid_args(x: Tensor, batch: int, act, col_scale: Tensor, col_zero: Tensor, col_sum: Tensor):
    """Pointers of the per-sample input grid (or placeholders in weight-only mode) and the grid stride."""
    if act is None:
        return (col_scale, col_scale, col_zero), 0, (0.0, 0.0, 0.0)
    scale, zero, row_zero, qmin, qmax, offset = act
    stride = 1 if scale.shape[0] == batch and batch > 1 else 0
    check(scale.shape[0] in (1, batch), f"{scale.shape[0]} input grids for a batch of {batch}")
    return (scale.float().contiguous(), zero.float().contiguous(), row_zero.to(torch.int32).contiguous()), stride, \
        (float(qmin), float(qmax), float(offset))


def linear(x: Tensor, codes: Tensor, bits: int, k: int, col_scale: Tensor, col_zero: Tensor, col_sum: Tensor,
           bias: Tensor | None, rows: int, act: tuple | None, out_dtype: torch.dtype) -> Tensor:
    """``y = x_hat @ w_hat^T + bias`` ``(M, N)`` of float rows ``x`` ``(M, K)`` in one kernel.

    Args:
        x: ``(M, K)`` float input rows (last dimension contiguous), or with ``act`` their int8 codes already
            quantized with that grid (the kernel then skips its quantizing prologue); sample ``i`` owns rows
            ``i*rows ... (i+1)*rows-1``.
        codes: weight codes, uint8 ``(N, ceil(K/2))`` two per byte for ``bits`` 4, else int8 ``(N, K)``.
        k: the reduction length K.
        col_scale, col_zero, col_sum: float32 ``s_w``, int32 ``zw`` and int32 ``colsum(b)`` per output channel.
        bias: float32 ``(N,)`` or None.
        act: ``(scale, zero_point, row_zero, qmin, qmax, offset)`` of the input quantizer (per-sample
            tensors of length B or 1), or None for weight-only mode (``x`` multiplied in its own dtype).
        out_dtype: the output dtype.
    """
    _check_device(x)
    m, n = x.shape[0], codes.shape[0]
    check(x.ndim == 2 and x.shape[1] == k, f"linear input of shape {tuple(x.shape)} for K={k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    batch = max(1, m // max(1, rows))
    (p_s, p_z, p_zx), stride, (qmin, qmax, offset) = _grid_args(x, batch, act, col_scale, col_zero, col_sum)
    out = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0:
        return out
    _linear_tuned[_grid(m, n)](
        x, codes, out, bias if bias is not None else col_scale, p_s, p_z, p_zx, col_scale, col_zero, col_sum,
        m, n, k, max(1, rows), stride, x.stride(0), codes.stride(0), out.stride(0), qmin, qmax, offset,
        W4=bits == 4, INTEGER=act is not None, HAS_BIAS=bias is not None)
    return out


def conv2d(x: Tensor, codes: Tensor, bits: int, kernel_size: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int], col_scale: Tensor, col_zero: Tensor, col_sum: Tensor, bias: Tensor | None,
           act: tuple | None, out_dtype: torch.dtype) -> Tensor:
    """A convolution (groups 1, dilation 1, zero padding) of a float input in one implicit-GEMM kernel.

    Args:
        x: ``(B, C, H, W)`` float input whose channels are contiguous (channels-last strides; a channel slice
            of a channels-last tensor is fine), or with ``act`` its int8 codes (as :func:`linear`'s).
        codes: weight codes in ``(kh, kw, c)`` reduction order, as :func:`linear`'s.
        act: as :func:`linear`'s (per-sample grids of length B or 1), or None for weight-only mode.

    Returns:
        ``(B, N, H_out, W_out)`` in ``out_dtype`` with channels-last strides.
    """
    _check_device(x)
    b, c, h, w = x.shape
    kh, kw = kernel_size
    kk = kh * kw * c
    if bits == 4 and c % 2:  # a (kh, kw) segment would start on an odd index: unpack (only tiny stem layers)
        from gaq.deploy.packing import unpack_int4
        codes, bits = unpack_int4(codes, kk).contiguous(), 8
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    n, m = codes.shape[0], b * ho * wo
    (p_s, p_z, p_zx), gstride, (qmin, qmax, offset) = _grid_args(x, b, act, col_scale, col_zero, col_sum)
    out = torch.empty((b, ho, wo, n), device=x.device, dtype=out_dtype)
    if m > 0:
        _conv_tuned[_grid(m, n)](
            x, codes, out, bias if bias is not None else col_scale, p_s, p_z, p_zx, col_scale, col_zero, col_sum,
            m, n, kk, c, h, w, ho, wo, gstride, x.stride(0), x.stride(2), x.stride(3), codes.stride(0), n,
            stride[0], stride[1], padding[0], padding[1], qmin, qmax, offset,
            KH=kh, KW=kw, W4=bits == 4, INTEGER=act is not None, HAS_BIAS=bias is not None)
    return out.permute(0, 3, 1, 2)


__all__ = ["AVAILABLE", "GEMM_SHAPES", "INTERPRET", "conv2d", "linear"]
