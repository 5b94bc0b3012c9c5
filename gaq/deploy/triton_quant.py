"""One-pass static activation quantization on the GPU (Triton): float input -> int8 codes.

``a = clamp(round(x / s_i) + z_i, qmin, qmax) - offset`` for every element of sample ``i``, with the
per-sample step ``s_i`` and zero point ``z_i`` read on the device (per-step scales need no host round
trip). Rounding is half to even and the division is IEEE-rounded, as ``torch.round(x / s)`` computes it
in float32, so the codes equal those of :meth:`gaq.deploy.layers.DeployedActQuant.codes` (the
reference, which runs anywhere). The input is read once in its own dtype and memory order (contiguous
or channels-last: the batch must be the outermost dimension in memory) and the int8 output keeps it.
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
except ImportError:  # CPU installs without triton: the torch reference path runs instead
    triton, tl, AVAILABLE = None, None, False

#: Elements per program of the quantization kernel.
BLOCK = 1024


if AVAILABLE:
    @triton.jit
    def _quantize_kernel(x_ptr, out_ptr, scale_ptr, zero_ptr, numel, per_sample, sample_stride,
                         qmin, qmax, offset, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sample = (offs // per_sample) * sample_stride  # sample_stride 0: one grid for the whole batch
        s = tl.load(scale_ptr + sample, mask=mask, other=1.0)
        z = tl.load(zero_ptr + sample, mask=mask, other=0.0)
        v = tl.math.div_rn(x, s)
        r = tl.floor(v + 0.5)  # round half to even: floor(v + 0.5), minus one on an odd tie
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)
        q = tl.minimum(tl.maximum(r + z, qmin), qmax)
        tl.store(out_ptr + offs, (q - offset).to(tl.int8), mask=mask)


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, offset: int) -> Tensor:
    """int8 codes of ``x`` (batch first, contiguous or channels-last) with per-sample ``scale`` / ``zero``
    (float32 ``(B,)`` or ``(1,)`` on ``x``'s device); same shape and memory format as ``x``."""
    check(AVAILABLE and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"),
          "the Triton activation quantizer needs triton and a CUDA tensor")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    out = torch.empty_like(x, dtype=torch.int8)
    numel = x.numel()
    if numel == 0:
        return out
    batch = x.shape[0]
    per_sample = max(1, numel // max(1, batch))
    stride = 1 if scale.shape[0] == batch and batch > 1 else 0
    grid = (triton.cdiv(numel, BLOCK),)
    _quantize_kernel[grid](x, out, scale.float().contiguous(), zero.float().contiguous(), numel, per_sample, stride,
                           float(qmin), float(qmax), float(offset), BLOCK=BLOCK)
    return out


__all__ = ["AVAILABLE", "quantize_codes"]
