"""One-pass static activation quantization on the GPU (Triton): float input -> int8 codes.

``a = clamp(round(x / s_i) + z_i, qmin, qmax) - offset`` for every element of sample ``i``, with the
per-sample step ``s_i`` and zero point ``z_i`` read on the device (per-step scales need no host round
trip). Rounding is half to even and the division is IEEE-rounded, as ``torch.round(x / s)`` computes it
in float32, so the codes equal those of :meth:`gaq.deploy.layers.DeployedActQuant.codes` (the
reference, which runs anywhere). Two kernels:

- :func:`quantize_codes`: any batch-first input, contiguous or channels-last (the batch must be the
  outermost dimension in memory), read once in its own dtype and memory order; the int8 output keeps it.
  The grid is (blocks of a sample, samples), so no element divides its index to find its sample;
- :func:`quantize_rows`: the rows ``(M, K)`` of a linear layer, and on request the int32 row sums of
  the codes in the same pass (what 8-bit weights with a zero point need: ``rowsum(a)``);
- :func:`fake_quantize`: ``x_hat = (q - z) * s`` in one pass, for the quantized operands a deployed model
  keeps in floating point (attention's queries, keys, values and probabilities).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from gaq.errors import check
from gaq.quant.step_context import one_or_per_sample

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU installs without triton: the torch reference path runs instead
    triton, tl, AVAILABLE = None, None, False

#: Whether kernels run in Triton's interpreter (numpy on the CPU), as the CPU tests run them.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Elements per program of :func:`quantize_codes`; rows and columns per tile of :func:`quantize_rows`.
BLOCK, ROWS_BLOCK, COLS_BLOCK = 2048, 16, 128


if AVAILABLE:
    from triton.language.extra import libdevice

    #: Kernels run in Triton's interpreter (the CPU tests), which has no ``libdevice.rint``.
    _INTERPRETED: tl.constexpr = tl.constexpr(INTERPRET)

    @triton.jit
    def _round_half_even(v):
        """``torch.round`` of a float32 tile: round half to even (one instruction on the GPU; in the interpreter
        floor(v + 0.5), minus one on an odd tie)."""
        if _INTERPRETED:
            r = tl.floor(v + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)
        else:
            return libdevice.rint(v)

    @triton.jit
    def _grid_code(x, s, z, qmin, qmax):
        """``clamp(round_half_even(x / s) + z, qmin, qmax)`` of a float32 tile, in float32."""
        return tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, s)) + z, qmin), qmax)

    @triton.jit
    def _quantize(x, s, z, qmin, qmax, offset):
        """int8 ``clamp(round_half_even(x / s) + z, qmin, qmax) - offset`` of a float32 tile."""
        return (_grid_code(x, s, z, qmin, qmax) - offset).to(tl.int8)

    @triton.jit
    def _quantize_kernel(x_ptr, out_ptr, scale_ptr, zero_ptr, per_sample, qmin, qmax, offset, FAKE: tl.constexpr,
                         BLOCK: tl.constexpr):
        sample = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < per_sample
        base = sample.to(tl.int64) * per_sample
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        s, z = tl.load(scale_ptr + sample), tl.load(zero_ptr + sample)
        if FAKE:  # x_hat = (q - z) * s in float32, stored in the input's dtype
            q = _grid_code(x, s, z, qmin, qmax)
            tl.store(out_ptr + base + offs, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + base + offs, _quantize(x, s, z, qmin, qmax, offset), mask=mask)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, out_ptr, sum_ptr, scale_ptr, zero_ptr, M, K, rows, grid_stride, stride_xm,
                              qmin, qmax, offset, ROWSUM: tl.constexpr, ROWS_BLOCK: tl.constexpr,
                              COLS_BLOCK: tl.constexpr):
        rm = tl.program_id(0) * ROWS_BLOCK + tl.arange(0, ROWS_BLOCK)
        mask_m = rm < M
        sample = (rm // rows) * grid_stride
        s = tl.load(scale_ptr + sample, mask=mask_m, other=1.0)
        z = tl.load(zero_ptr + sample, mask=mask_m, other=0.0)
        total = tl.zeros((ROWS_BLOCK,), dtype=tl.int32)
        for k0 in range(0, K, COLS_BLOCK):
            rk = k0 + tl.arange(0, COLS_BLOCK)
            mask = mask_m[:, None] & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=mask, other=0.0)
            q = _quantize(x.to(tl.float32), s[:, None], z[:, None], qmin, qmax, offset)
            tl.store(out_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], q, mask=mask)
            if ROWSUM:
                total += tl.sum(tl.where(mask, q.to(tl.int32), 0), axis=1)
        if ROWSUM:
            tl.store(sum_ptr + rm, total, mask=mask_m)


def _check(x: Tensor) -> None:
    check(AVAILABLE and (x.is_cuda or INTERPRET),
          "the Triton activation quantizer needs triton and a CUDA tensor")


def per_sample_grid(scale: Tensor, batch: int) -> bool:
    """Whether a grid of ``scale.shape[0]`` entries is one per sample of a batch of ``batch`` (else one grid for the
    whole batch); refuses any other length."""
    check(one_or_per_sample(scale.shape[0], batch), f"{scale.shape[0]} input grids for a batch of {batch}")
    return scale.shape[0] == batch and batch > 1


def _elementwise(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, offset: int, fake: bool) -> Tensor:
    _check(x)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    out = torch.empty_like(x) if fake else torch.empty_like(x, dtype=torch.int8)
    numel = x.numel()
    if numel == 0:
        return out
    samples = x.shape[0] if per_sample_grid(scale, x.shape[0]) else 1  # one grid: the whole tensor is one "sample"
    per_sample = numel // samples
    grid = (triton.cdiv(per_sample, BLOCK), samples)
    _quantize_kernel[grid](x, out, scale.float().contiguous(), zero.float().contiguous(), per_sample,
                           float(qmin), float(qmax), float(offset), FAKE=fake, BLOCK=BLOCK)
    return out


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, offset: int) -> Tensor:
    """int8 codes of ``x`` (batch first, contiguous or channels-last) with per-sample ``scale`` / ``zero``
    (float32 ``(B,)`` or ``(1,)`` on ``x``'s device); same shape and memory format as ``x``."""
    return _elementwise(x, scale, zero, qmin, qmax, offset, fake=False)


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` of ``x`` in one pass, computed in float32 and
    returned in ``x``'s dtype, shape and memory format (per-sample ``scale`` / ``zero`` as
    :func:`quantize_codes`')."""
    return _elementwise(x, scale, zero, qmin, qmax, 0, fake=True)


def quantize_rows(x: Tensor, scale: Tensor, zero: Tensor, rows: int, qmin: int, qmax: int, offset: int,
                  rowsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """int8 codes ``(M, K)`` of float rows ``x`` ``(M, K)`` (last dimension contiguous) whose sample ``i`` owns
    rows ``i*rows ... (i+1)*rows-1``, with per-sample ``scale`` / ``zero`` (``(B,)`` or ``(1,)``); and with
    ``rowsum`` the int32 sums of each row's codes ``(M,)`` (else None)."""
    _check(x)
    check(x.ndim == 2, f"quantize_rows takes (M, K) rows, got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, k), device=x.device, dtype=torch.int8)
    sums = torch.empty((m,), device=x.device, dtype=torch.int32) if rowsum else None
    if m == 0:
        return out, sums
    stride = 1 if per_sample_grid(scale, max(1, m // max(1, rows))) else 0
    _quantize_rows_kernel[(triton.cdiv(m, ROWS_BLOCK),)](
        x, out, sums if rowsum else out, scale.float().contiguous(), zero.float().contiguous(), m, k, max(1, rows),
        stride, x.stride(0), float(qmin), float(qmax), float(offset), ROWSUM=rowsum, ROWS_BLOCK=ROWS_BLOCK,
        COLS_BLOCK=COLS_BLOCK)
    return out, sums


__all__ = ["AVAILABLE", "INTERPRET", "fake_quantize", "per_sample_grid", "quantize_codes", "quantize_rows"]
