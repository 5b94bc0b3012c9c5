"""The integer operations of a deployed layer, and their exact reference.

Notation (one quantized layer, ``K`` = reduction length, ``N`` = output channels):

- activations: the fake-quantized input is ``x_hat = (q_x - z_x) * s_x`` with ``q_x`` in
  ``[qmin, qmax]`` (``[0, 255]`` asymmetric 8-bit, ``[-128, 127]`` symmetric). The deployed layer holds
  ``a = q_x - off_x`` as int8 (``off_x = 128`` for an asymmetric grid, 0 for a symmetric one) and the
  *row zero* ``zx = z_x - off_x`` (an integer that fits int8), so ``x_hat = (a - zx) * s_x``;
- weights: ``w_hat = (q_w - z_w) * s_w`` per output channel with ``q_w`` in ``[0, 2^b - 1]``. The
  deployed layer holds ``b = q_w - 2^(b-1)`` (int8 in ``[-2^(b-1), 2^(b-1) - 1]``; 4-bit codes packed two
  per byte, see :mod:`gaq.deploy.packing`) and the *column zero* ``zw = z_w - 2^(b-1)`` (int32);
- so ``y[m, n] = s_x[m] * s_w[n] * acc[m, n] + bias[n]`` with the exact integer
  ``acc = sum_k (a - zx)(b - zw) = a.b - zw * rowsum(a) - zx * colsum(b) + K * zx * zw``,
  where ``colsum(b)`` is precomputed per output channel. ``a.b`` is what an int8 tensor-core GEMM
  computes; the three corrections are rank-1. Every term is an integer, so ``acc`` is exact in int32
  (:func:`accumulator_bound` says when it fits) and the result differs from the fake-quantized layer's
  only by the rounding of the final float products.

Scales and zeros are per *sample* (per-step activation scales give each sample its own ``s_x``,
``zx``): arrays of length B, and the rows of sample ``i`` are ``i * rows_per_sample ... (i + 1) *
rows_per_sample - 1`` (tokens of a linear layer, output pixels of a convolution).

A convolution's reduction index runs over ``(kh, kw, c)`` (channels fastest), the order an
implicit-GEMM kernel reads a channels-last input in. Zero padding of ``x_hat`` is padding of ``a`` with
``zx`` (``a - zx = 0``).

The reference functions compute ``acc`` in float64 (integers below 2^53 are exact there) with
PyTorch's own matmul / conv2d, on any device; the fast paths (``torch._int_mm`` and the Triton kernels
of :mod:`gaq.deploy.triton_kernels`) must equal them bit for bit in ``acc``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Largest |accumulator| an int32 holds.
INT32_MAX = 2**31 - 1


def accumulator_bound(k: int, max_abs_a_minus_zx: int, max_abs_b_minus_zw: int) -> int:
    """An upper bound of ``|acc|`` for reduction length ``k``: ``k * max|a - zx| * max|b - zw|``."""
    return int(k) * int(max_abs_a_minus_zx) * int(max_abs_b_minus_zw)


def per_row(values: Tensor, rows_per_sample: int) -> Tensor:
    """Per-sample values ``(B,)`` repeated for each of a sample's rows: ``(B * rows_per_sample,)``."""
    if rows_per_sample == 1:
        return values
    # expand + reshape, not repeat_interleave: that reads its output size back to the host (a sync per layer)
    return values[:, None].expand(values.shape[0], rows_per_sample).reshape(-1)


def activation_codes(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, offset: int) -> Tensor:
    """int8 codes ``a = clamp(round(x / s) + z, qmin, qmax) - offset`` of ``x`` (batch first) with per-sample
    ``scale`` / ``zero`` ``(B,)`` or ``(1,)``, computed at float32 as the fake quantizer computes them
    (``torch.round`` rounds half to even); same shape as ``x``."""
    shape = (scale.shape[0],) + (1,) * (x.ndim - 1)
    q = torch.clamp(torch.round(x.float() / scale.view(shape)) + zero.view(shape), qmin, qmax)
    return (q - offset).to(torch.int8)


def epilogue(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``row_scale[m] * col_scale[n] * acc[m, n] + bias[n]`` in float32, cast to ``out_dtype``."""
    y = acc.to(torch.float32) * (row_scale.to(torch.float32)[:, None] * col_scale.to(torch.float32)[None, :])
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def linear_reference(a: Tensor, b: Tensor, row_zero: Tensor, col_zero: Tensor) -> Tensor:
    """Exact ``acc = (a - zx) @ (b - zw)^T`` in float64.

    Args:
        a: int8 ``(M, K)`` activation codes. b: int8 ``(N, K)`` weight codes (unpacked).
        row_zero: ``(M,)`` integer zx per row. col_zero: ``(N,)`` integer zw per output channel.

    Returns:
        float64 ``(M, N)`` holding integers.
    """
    a64 = a.to(torch.float64) - row_zero.to(torch.float64)[:, None]
    b64 = b.to(torch.float64) - col_zero.to(torch.float64)[:, None]
    return a64 @ b64.T


def conv2d_reference(a: Tensor, b: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int], row_zero: Tensor, col_zero: Tensor) -> Tensor:
    """Exact ``acc`` of a convolution in float64.

    Args:
        a: int8 ``(B, C, H, W)`` activation codes (any memory format).
        b: int8 ``(N, KH * KW * C)`` weight codes, reduction index ``(kh, kw, c)`` with c fastest.
        kernel_size, stride, padding: as ``nn.Conv2d`` (dilation 1, groups 1).
        row_zero: ``(B,)`` integer zx per sample. col_zero: ``(N,)`` integer zw per output channel.

    Returns:
        float64 ``(B, N, H_out, W_out)`` holding integers.
    """
    kh, kw = kernel_size
    n, c = b.shape[0], a.shape[1]
    x = a.to(torch.float64) - row_zero.to(torch.float64)[:, None, None, None]  # zero padding of x_hat = a - zx
    w = (b.to(torch.float64) - col_zero.to(torch.float64)[:, None]).reshape(n, kh, kw, c).permute(0, 3, 1, 2)
    return F.conv2d(x, w, None, stride, padding)


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` of int8 ``(M, K)`` and ``(N, K)`` as int32: ``torch._int_mm`` (the int8 tensor-core GEMM on
    CUDA; it wants the second operand column-major, which ``b.T`` of a row-major ``b`` is)."""
    return torch._int_mm(a, b.T)


__all__ = ["INT32_MAX", "accumulator_bound", "activation_codes", "conv2d_reference", "epilogue", "int_mm", "linear_reference", "per_row"]
