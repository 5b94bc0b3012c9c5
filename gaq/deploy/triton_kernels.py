"""gaq's Triton kernels of deployed layers: an int8 GEMM with the zero points and scales in its epilogue.

Two kernels, each in two modes:

- :func:`linear` (``(M, K) x (N, K)^T``) and :func:`conv2d` (implicit GEMM over a channels-last input:
  the reduction runs over ``(kh, kw, c)`` with channels fastest, as :mod:`gaq.deploy.kernels` orders the
  weight codes; no im2col buffer); :func:`linear_codes` is the linear kernel whose epilogue also applies an
  activation and quantizes the result with the next layer's grid (int8 codes out);
- *integer* mode: the input arrives as int8 codes ``a`` (quantized in one pass by
  :func:`gaq.deploy.triton_quant.quantize_codes`: quantizing in this kernel's prologue repeated the work
  for every block of output columns and measured slower on the H200), multiplied on the int8 tensor cores
  with the weight codes into an exact int32 accumulator. The loop does nothing but load and multiply:
  4-bit weights are unpacked from two per byte with their zero point already subtracted
  (``b' = q - z_w``, in ``[-15, 15]``: no row sums of ``a`` are needed, ``acc = a.b' - zx * colsum(b')``);
  8-bit weights with a zero point need ``rowsum(a)`` (``acc = a.b - zw*rowsum(a) - zx*colsum(b) +
  K*zx*zw``), which a linear layer's caller computes once (one reduction of the codes) and the
  convolution sums on the way. The epilogue applies the corrections, the scales ``s_x[m] * s_w[n]`` in
  float32 and the bias, and stores the compute dtype. ``acc`` equals
  :func:`gaq.deploy.kernels.linear_reference` exactly, and the output the reference epilogue bit for bit;
- *weight-only* mode (the input stays FP: W4A16 / W8A16): the weight tile is dequantized
  ``(b - zw) * s_w`` in float32 and cast to the input's dtype in registers, a tensor-core GEMM in that
  dtype accumulates in float32 (IEEE float32 products for a float32 input: no TF32); only the codes are
  read from memory.

Spatial zero padding of a convolution: a padded pixel of ``x_hat = 0.0`` has the code ``zx``, so the
kernel reads the row zero there (``a - zx = 0``), and 0.0 in weight-only mode.

On a CUDA device the block sizes are autotuned per shape (the row count bucketed to a power of two, so a
new batch size re-tunes only when it changes the bucket); under ``TRITON_INTERPRET=1`` (the CPU tests) one
small configuration runs. torch.compile traces the kernel launches directly.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import Tensor

from gaq.deploy.packing import pack_int4, unpack_int4
from gaq.deploy.triton_quant import INTERPRET, per_sample_grid
from gaq.errors import check

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU installs without triton: gaq.deploy falls back to torch._int_mm
    triton, tl, AVAILABLE = None, None, False
try:  # host-side tensor-memory-accelerator descriptors (Triton 3.4 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

#: Activations the linear kernel's epilogue applies before quantizing its output for the next layer (the
#: ``ACT`` constant of the kernel): diffusers' ``GELU`` module, ``F.gelu`` with ``approximate`` none or tanh.
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}



class GemmWeights(NamedTuple):
    """A layer's weight as the kernels take it (build it with :func:`gemm_weights`).

    Attributes:
        codes: bits 4: uint8 ``(N, ceil(K/2))``, nibbles ``q = b + 8`` of neighbouring reduction indices (the
            even one low, :mod:`gaq.deploy.packing`); bits 8: int8 ``(N, K)`` codes ``b``.
        bits: 4 or 8. k: the reduction length K.
        scale: float32 ``s_w`` ``(N,)``.
        zero: int32 ``(N,)``: bits 4: the nibble-domain zero point ``z_w = zw + 8`` the kernel subtracts from each
            nibble; bits 8: ``zw`` (applied in the epilogue).
        col_sum: int32 ``(N,)``: bits 4: ``colsum(q - z_w)``; bits 8: ``colsum(b)``.
        zero_free: bits 8 with ``zw == 0`` in every column (no row sums needed); True for bits 4.
    """

    codes: Tensor
    bits: int
    k: int
    scale: Tensor
    zero: Tensor
    col_sum: Tensor
    zero_free: bool


def gemm_weights(b: Tensor, bits: int, scale: Tensor, zw: Tensor, stored: Tensor | None = None) -> GemmWeights:
    """:class:`GemmWeights` of signed codes ``b`` (int8 ``(N, K)``, ``w_hat = (b - zw) * s_w``) and the per-channel
    ``scale`` / integer ``zw``; ``stored`` is the packed form of 4-bit codes where the caller holds it already."""
    k = int(b.shape[1])
    zw = zw.to(torch.int32).contiguous()
    colsum = b.sum(dim=1, dtype=torch.int32)
    scale = scale.float().contiguous()
    if bits == 4:
        codes = stored if stored is not None else pack_int4(b)
        return GemmWeights(codes, 4, k, scale, (zw + 8).contiguous(), (colsum - k * zw).contiguous(), True)
    return GemmWeights(b.contiguous(), 8, k, scale, zw, colsum, not bool(zw.any()))


def int4_foldable(w: GemmWeights) -> bool:
    """Whether every 4-bit code minus its row's zero point, ``q - z_w``, fits int8 (``-112 <= z_w <= 128``): what
    unpacking with the zero point folded in needs. A row of weights all of one sign with a narrow range can have its
    zero point far outside the grid; such weights run as :func:`as_int8` (reads the device: call once, at build)."""
    return w.bits != 4 or w.zero.numel() == 0 or bool(((w.zero >= -112) & (w.zero <= 128)).all())


def as_int8(w: GemmWeights) -> GemmWeights:
    """The int8 form ``b`` of 4-bit weights, with the zero point applied in the epilogue (for weights that
    :func:`int4_foldable` refuses, and convolutions whose channel segments start on odd indices)."""
    zw = w.zero - 8
    return GemmWeights(unpack_int4(w.codes, w.k).contiguous(), 8, w.k, w.scale, zw, w.col_sum + w.k * zw,
                       False)


def unpacked(w: GemmWeights) -> GemmWeights:
    """4-bit weights as int8 codes ``b - zw`` ``(N, K)`` with no zero point left (one pass over the packed bytes on a
    GPU, torch ops elsewhere and under torch.compile): the plain int8 GEMM's weight for int8 activations, equal in
    every product (``zero`` keeps the nibble zero, which only weight-only mode would read: not for that mode), for
    weights :func:`int4_foldable` accepts."""
    check(w.bits == 4, "unpacked takes 4-bit weights")
    n = w.codes.shape[0]
    if AVAILABLE and (w.codes.is_cuda or INTERPRET) and not torch.compiler.is_compiling():
        out = torch.empty((n, w.k), device=w.codes.device, dtype=torch.int8)
        _unpack_kernel[(n, triton.cdiv(w.codes.shape[1], UNPACK_BLOCK))](
            w.codes, w.zero, out, w.k, w.codes.shape[1], BLOCK=UNPACK_BLOCK)
    else:  # under torch.compile Inductor fuses these ops into the kernels around them: measured on an H200 (DiT-XL/2
        # W4A8, batch 64), the unpacking as a custom operator of its own took 1.1 ms in 257 launches and saved nothing
        out = (unpack_int4(w.codes, w.k).to(torch.int32) + 8 - w.zero[:, None]).to(torch.int8)
    return GemmWeights(out, 8, w.k, w.scale, w.zero, w.col_sum, True)


#: Packed bytes per program of the unpacking kernel.
UNPACK_BLOCK = 512


def _configs(shapes: list[tuple[int, int, int, int, int]], pre_hook=None) -> list:
    """Autotune candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``; one small one in the interpreter."""
    if INTERPRET:
        shapes = [(32, 32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s,
                          pre_hook=pre_hook) for m, n, k, w, s in shapes]


#: Candidates for the GEMMs of diffusion models on Hopper-class GPUs (int8 MMAs want K tiles of 128 bytes):
#: N from 32 to 6,912, K from 16 to 4,608, M from one row per sample to 65,536 tokens.
GEMM_SHAPES = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4),
               (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 64, 4, 4)]


#: Candidates of the TMA kernel: every stage holds a (BLOCK_M + BLOCK_N) x BLOCK_K operand tile in shared memory
#: (at most 3 x 48 KB here, of the 227 KB an H100 / H200 block may use).
TMA_SHAPES = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
              (128, 256, 64, 8, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]


def _tma_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the candidate's operand tiles as the descriptors' block shapes."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _prune(configs, named_args, **kwargs):
    """Drop candidates whose row block exceeds the (bucketed) row count, or whose column block the column count,
    by more than 2x: they only compute padding (and each candidate costs a compile)."""
    m, n = named_args["m_bucket"], named_args["N"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, 2 * m) and c.kwargs["BLOCK_N"] <= max(64, 2 * n)]
    return kept or configs[-1:]


if AVAILABLE:
    from gaq.deploy.triton_quant import _round_half_even

    @triton.jit
    def _weight_tile(w_ptr, rn, wz, k0, K, stride_wn, W4: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """int8 weight codes ``(BLOCK_N, BLOCK_K)`` of rows ``rn`` at reduction indices ``k0 ... k0 + BLOCK_K - 1``
        (``k0`` even for 4-bit): ``b`` for 8-bit, ``q - z_w`` for 4-bit (``wz`` the nibble zero per row); entries
        past K are arbitrary (the input there is zero)."""
        if W4:
            rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            ptrs = w_ptr + rn[:, None] * stride_wn + rh[None, :]
            if EVEN_K:
                p = tl.load(ptrs)
            else:
                p = tl.load(ptrs, mask=rh[None, :] < (K + 1) // 2, other=0)
            lo = ((p & 15).to(tl.int32) - wz[:, None]).to(tl.int8)
            hi = ((p >> 4).to(tl.int32) - wz[:, None]).to(tl.int8)
            b = tl.interleave(lo, hi)  # the even index in the low nibble
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
            if EVEN_K:
                b = tl.load(ptrs)
            else:
                b = tl.load(ptrs, mask=rk[None, :] < K, other=0)
        return b

    @triton.jit
    def _unpack_kernel(p_ptr, zq_ptr, out_ptr, K, KB, BLOCK: tl.constexpr):
        """Row ``program_id(0)`` of packed nibbles to int8 ``q - z_w`` (even index from the low nibble)."""
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        p = tl.load(p_ptr + row.to(tl.int64) * KB + j, mask=j < KB, other=0)
        zq = tl.load(zq_ptr + row)
        base = out_ptr + row.to(tl.int64) * K
        tl.store(base + 2 * j, ((p & 15).to(tl.int32) - zq).to(tl.int8), mask=2 * j < K)
        tl.store(base + 2 * j + 1, ((p >> 4).to(tl.int32) - zq).to(tl.int8), mask=2 * j + 1 < K)

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column block of this program (:func:`_tile_of`)."""
        return _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    @triton.jit
    def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column block of output tile ``pid``, grouped along M so neighbours share weight tiles in L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _mma(x, b, acc, wz, sw, W4: tl.constexpr, INTEGER: tl.constexpr):
        """``acc + x @ b^T``: int8 on the int8 tensor cores, or weight-only with ``b`` dequantized to x's dtype."""
        if INTEGER:
            acc = tl.dot(x, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            if W4:  # the nibble zero is already subtracted
                wd = (b.to(tl.float32) * sw[:, None]).to(x.dtype)
            else:
                wd = ((b.to(tl.float32) - wz[:, None].to(tl.float32)) * sw[:, None]).to(x.dtype)
            if x.dtype == tl.float32:  # IEEE products for a float32 input (no TF32); bf16 / fp16 take the MMA
                acc = tl.dot(x, tl.trans(wd), acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc = tl.dot(x, tl.trans(wd), acc, out_dtype=tl.float32)
        return acc

    @triton.jit
    def _activation(y, ACT: tl.constexpr):
        """The epilogue's activation of a float32 tile (:data:`ACTIVATIONS`)."""
        if ACT == 1:  # GELU, erf form
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        elif ACT == 2:  # GELU, tanh form: tanh(u) = 2 * sigmoid(2u) - 1 (u clamped where sigmoid is 0 or 1 in float32)
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y * tl.sigmoid(2.0 * tl.minimum(tl.maximum(u, -40.0), 40.0))
        return y

    @triton.jit
    def _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, sample, out_ptr, stride_om, bias_ptr, sx_ptr, zx_ptr,
                  sw_ptr, zw_ptr, cs_ptr, K, INTEGER: tl.constexpr, ZW: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr, QOUT: tl.constexpr, QROWSUM: tl.constexpr, out_sample, os_ptr, oz_ptr, ors_ptr,
                  oqmin, oqmax, ooffset):
        """Corrections, scales and bias of an accumulator tile, then the activation; stores the output dtype, or
        with ``QOUT`` the int8 codes of the next layer's input grid (``out_sample`` selects it per row) and, with
        ``QROWSUM``, adds each row's code sums to ``ors_ptr``."""
        if INTEGER:
            zx = tl.load(zx_ptr + sample, mask=mask_m, other=0)
            cs = tl.load(cs_ptr + rn, mask=mask_n, other=0)
            acc = acc - zx[:, None] * cs[None, :]
            if ZW:
                zw = tl.load(zw_ptr + rn, mask=mask_n, other=0)
                acc = acc - zw[None, :] * rowsum[:, None] + K * zx[:, None] * zw[None, :]
            sx = tl.load(sx_ptr + sample, mask=mask_m, other=1.0)
            sw = tl.load(sw_ptr + rn, mask=mask_n, other=1.0)
            y = acc.to(tl.float32) * (sx[:, None] * sw[None, :])
        else:
            y = acc
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
        y = _activation(y, ACT)
        mask = mask_m[:, None] & mask_n[None, :]
        ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        if QOUT:
            # times the reciprocal step, not the IEEE division of the one-pass quantizer: an epilogue that divides every
            # element costs the GEMM more than the pass it saves; the codes differ only where y / s lies within a
            # rounding of a half-integer
            inv = 1.0 / tl.load(os_ptr + out_sample, mask=mask_m, other=1.0)
            zo = tl.load(oz_ptr + out_sample, mask=mask_m, other=0.0)
            q = tl.minimum(tl.maximum(_round_half_even(y * inv[:, None]) + zo[:, None], oqmin), oqmax)
            c = (q - ooffset).to(tl.int8)
            tl.store(ptrs, c, mask=mask)
            if QROWSUM:
                tl.atomic_add(ors_ptr + rm, tl.sum(tl.where(mask, c.to(tl.int32), 0), axis=1), mask=mask_m)
        else:
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr,
                       os_ptr, oz_ptr, ors_ptr, M, N, K, rows, grid_stride, out_grid_stride, stride_xm, stride_wn,
                       stride_om, m_bucket, oqmin, oqmax, ooffset,
                       W4: tl.constexpr, INTEGER: tl.constexpr, ZW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACT: tl.constexpr, QOUT: tl.constexpr, QROWSUM: tl.constexpr,
                       EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        ra, rb = rm % M, rn % N  # loads stay in bounds without masks; the store is masked
        sample = (rm // rows) * grid_stride  # grid_stride 0: one grid for every row
        wz = tl.load(zw_ptr + rb)
        sw = tl.load(sw_ptr + rb)
        if INTEGER:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + ra[:, None].to(tl.int64) * stride_xm
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(x_rows + rk[None, :])
            else:
                x = tl.load(x_rows + rk[None, :], mask=rk[None, :] < K, other=0)
            b = _weight_tile(w_ptr, rb, wz, k0, K, stride_wn, W4, EVEN_K, BLOCK_K)
            acc = _mma(x, b, acc, wz, sw, W4, INTEGER)
        if ZW:
            rowsum = tl.load(rs_ptr + rm, mask=mask_m, other=0)
        else:
            rowsum = rm
        _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, sample, out_ptr, stride_om, bias_ptr, sx_ptr, zx_ptr,
                  sw_ptr, zw_ptr, cs_ptr, K, INTEGER, ZW, HAS_BIAS, ACT, QOUT, QROWSUM,
                  (rm // rows) * out_grid_stride, os_ptr, oz_ptr, ors_ptr, oqmin, oqmax, ooffset)

    @triton.jit
    def _linear_tma_kernel(x_desc, w_desc, out_ptr, bias_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr,
                           os_ptr, oz_ptr, ors_ptr, M, N, K, rows, grid_stride, out_grid_stride, stride_om, m_bucket,
                           oqmin, oqmax, ooffset,
                           ZW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, QOUT: tl.constexpr,
                           QROWSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
        """The integer mode of :func:`_linear_kernel` with int8 weight codes, its operands read by the tensor memory
        accelerator (one descriptor each; rows and reduction indices past the ends read as zeros), persistent: each
        program walks output tiles ``program_id, program_id + programs, ...``, so the loads of its next tile are
        issued while the current one's epilogue runs."""
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                x = x_desc.load([pid_m * BLOCK_M, k0])
                b = w_desc.load([pid_n * BLOCK_N, k0])
                acc = tl.dot(x, b.T, acc, out_dtype=tl.int32)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_m, mask_n = rm < M, rn < N
            if ZW:
                rowsum = tl.load(rs_ptr + rm, mask=mask_m, other=0)
            else:
                rowsum = rm
            _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, (rm // rows) * grid_stride, out_ptr, stride_om, bias_ptr,
                      sx_ptr, zx_ptr, sw_ptr, zw_ptr, cs_ptr, K, True, ZW, HAS_BIAS, ACT, QOUT, QROWSUM,
                      (rm // rows) * out_grid_stride, os_ptr, oz_ptr, ors_ptr, oqmin, oqmax, ooffset)

    @triton.jit
    def _conv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, sx_ptr, zx_ptr, sw_ptr, zw_ptr, cs_ptr,
                     M, N, K, C, H, W, HO, WO, grid_stride, stride_xb, stride_xh, stride_xw, stride_wn, stride_om,
                     SH, SW, PH, PW, m_bucket,
                     KH: tl.constexpr, KW: tl.constexpr, W4: tl.constexpr, INTEGER: tl.constexpr, ZW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        rb = rn % N
        bi = rm // (HO * WO)
        oh = (rm % (HO * WO)) // WO
        ow = rm % WO
        sample = bi * grid_stride
        wz = tl.load(zw_ptr + rb)
        sw = tl.load(sw_ptr + rb)
        if INTEGER:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            zx_row = tl.load(zx_ptr + sample, mask=mask_m, other=0).to(tl.int8)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            zx_row = rm
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh * SH - PH + kh
                iw = ow * SW - PW + kw
                inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                pix = x_ptr + bi.to(tl.int64) * stride_xb + ih * stride_xh + iw * stride_xw
                for c0 in range(0, C, BLOCK_K):
                    rc = c0 + tl.arange(0, BLOCK_K)
                    if EVEN_K:  # C a multiple of the K tile: every channel of the tile is real
                        x = tl.load(pix[:, None] + rc[None, :], mask=inside[:, None], other=0)
                        if INTEGER:  # a padded pixel is the code of 0.0, the row zero
                            x = tl.where(inside[:, None], x, zx_row[:, None]).to(tl.int8)
                    else:
                        in_c = rc[None, :] < C
                        x = tl.load(pix[:, None] + rc[None, :], mask=inside[:, None] & in_c, other=0)
                        if INTEGER:  # a padded pixel is the code of 0.0, the row zero; channels past C are 0
                            x = tl.where(in_c, tl.where(inside[:, None], x, zx_row[:, None]), 0).to(tl.int8)
                    if INTEGER and ZW:
                        rowsum += tl.sum(x.to(tl.int32), axis=1)
                    b = _weight_tile(w_ptr, rb, wz, (kh * KW + kw) * C + c0, K, stride_wn, W4, EVEN_K, BLOCK_K)
                    acc = _mma(x, b, acc, wz, sw, W4, INTEGER)
        _epilogue(acc, rowsum, rm, rn, mask_m, mask_n, sample, out_ptr, stride_om, bias_ptr, sx_ptr, zx_ptr,
                  sw_ptr, zw_ptr, cs_ptr, K, INTEGER, ZW, HAS_BIAS, 0, False, False, sample, sx_ptr, sx_ptr, zx_ptr,
                  0.0, 0.0, 0.0)

    _tune = {"prune_configs_by": {"early_config_prune": _prune}}
    if "cache_results" in inspect.signature(triton.autotune).parameters:  # the choice per shape kept on disk
        _tune["cache_results"] = True  # (Triton's cache folder), so a new process does not time the candidates again
    _linear_tuned = triton.autotune(_configs(GEMM_SHAPES), key=["m_bucket", "N", "K", "W4", "INTEGER", "ZW", "ACT", "QOUT"],
                                    **_tune)(_linear_kernel)
    _conv_tuned = triton.autotune(_configs(GEMM_SHAPES), key=["m_bucket", "N", "K", "C", "W4", "INTEGER", "ZW"],
                                  **_tune)(_conv_kernel)
    _linear_tma_tuned = triton.autotune(_configs(TMA_SHAPES, _tma_blocks),
                                        key=["m_bucket", "N", "K", "ZW", "ACT", "QOUT"], **_tune)(_linear_tma_kernel)


#: The largest candidate BLOCK_K; every candidate's (and the interpreter's 32) divides it.
_K_STEP = max(k for _, _, k, _, _ in GEMM_SHAPES)
assert all(_K_STEP % k == 0 for _, _, k, _, _ in GEMM_SHAPES) and _K_STEP % 32 == 0


def _even_k(k: int) -> bool:
    """Whether K (a convolution: its channels C) is a multiple of every candidate's BLOCK_K, so no load needs a
    K mask."""
    return k % _K_STEP == 0


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _persistent_grid(m: int, n: int, programs: int):
    return lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)


def _bucket(m: int) -> int:
    """The row count rounded up to a power of two (at least 16): the autotune key of M."""
    return max(16, 1 << (max(1, m) - 1).bit_length())


def _check_device(x: Tensor) -> None:
    check(AVAILABLE and (x.is_cuda or INTERPRET), "gaq's Triton kernels need triton and a CUDA tensor "
          "(or TRITON_INTERPRET=1); set deploy.linear_kernel / deploy.conv_kernel to int_mm / im2col")


def _grid_args(x: Tensor, batch: int, act: tuple[Tensor, Tensor] | None, w: GemmWeights):
    """Pointers of the per-sample input grid (placeholders in weight-only mode) and the grid stride."""
    if act is None:
        return (w.scale, w.zero), 0
    check(x.dtype == torch.int8, f"the integer kernels take int8 codes of the input (quantize_codes), got {x.dtype}")
    scale, row_zero = act
    stride = 1 if per_sample_grid(scale, batch) else 0
    return (scale.float().contiguous(), row_zero.to(torch.int32).contiguous()), stride


def tma_ready(device: torch.device) -> bool:
    """Whether the TMA linear kernel can run on ``device``: Triton with host-side descriptors and a GPU of compute
    capability 9.0 (Hopper) or later, or Triton's interpreter."""
    if not AVAILABLE or TensorDescriptor is None:
        return False
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_fits(t: Tensor) -> bool:
    """Whether an int8 matrix can be a TMA operand: 16-byte aligned start and row stride, contiguous rows."""
    return t.dtype == torch.int8 and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


def _programs(device: torch.device) -> int:
    """Programs of the persistent kernel: one per streaming multiprocessor (4 in the interpreter)."""
    return 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _launch_linear(x: Tensor, codes: Tensor, bits: int, k: int, scale: Tensor, zero: Tensor, col_sum: Tensor,
                   bias: Tensor | None, rows: int, grid_stride: int, act_scale: Tensor, act_zero: Tensor,
                   rowsum: Tensor | None, zw: bool, integer: bool, out: Tensor, activation: int = 0,
                   out_grid: tuple[Tensor, Tensor, int, list[float]] | None = None,
                   out_rowsum: Tensor | None = None, tma: bool = False) -> None:
    """One launch of the linear kernel into ``out``; ``out_grid`` = (scale, zero, grid stride, [qmin, qmax,
    offset]) of the next layer's input quantizer makes ``out`` its int8 codes (``out_rowsum``: their row sums,
    added to a zeroed buffer). ``tma``: the TMA kernel where the call qualifies (int8 codes on both sides, aligned;
    :func:`tma_ready`), the pointer kernel otherwise."""
    m, n = x.shape[0], codes.shape[0]
    if m == 0:
        return
    o_scale, o_zero, o_stride, (o_min, o_max, o_off) = out_grid if out_grid is not None else (
        scale, scale, 0, [0.0, 0.0, 0.0])
    operands = (out, bias if bias is not None else scale, act_scale, act_zero, rowsum if zw else zero, scale, zero,
                col_sum, o_scale, o_zero, out_rowsum if out_rowsum is not None else zero, m, n, k, rows, grid_stride,
                o_stride)
    tail = (out.stride(0), _bucket(m), float(o_min), float(o_max), float(o_off))
    flags = dict(ZW=zw, HAS_BIAS=bias is not None, ACT=int(activation), QOUT=out_grid is not None,
                 QROWSUM=out_rowsum is not None)
    if tma and integer and bits == 8 and _tma_fits(x) and _tma_fits(codes) and tma_ready(x.device):
        _linear_tma_tuned[_persistent_grid(m, n, _programs(x.device))](
            TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 16]),  # block shapes: set per candidate
            TensorDescriptor(codes, list(codes.shape), list(codes.stride()), [1, 16]), *operands, *tail, **flags)
    else:
        _linear_tuned[_grid(m, n)](x, codes, *operands, x.stride(0), codes.stride(0), *tail, W4=bits == 4,
                                   INTEGER=integer, EVEN_K=_even_k(k), **flags)


def _run_linear(x: Tensor, codes: Tensor, bits: int, k: int, scale: Tensor, zero: Tensor, col_sum: Tensor,
                bias: Tensor | None, rows: int, grid_stride: int, act_scale: Tensor, act_zero: Tensor,
                rowsum: Tensor | None, zw: bool, integer: bool, out_dtype: torch.dtype, tma: bool) -> Tensor:
    out = torch.empty((x.shape[0], codes.shape[0]), device=x.device, dtype=out_dtype)
    _launch_linear(x, codes, bits, k, scale, zero, col_sum, bias, rows, grid_stride, act_scale, act_zero, rowsum, zw,
                   integer, out, tma=tma)
    return out


def _run_linear_codes(x: Tensor, codes: Tensor, bits: int, k: int, scale: Tensor, zero: Tensor, col_sum: Tensor,
                      bias: Tensor | None, rows: int, grid_stride: int, act_scale: Tensor, act_zero: Tensor,
                      rowsum: Tensor | None, zw: bool, activation: int, out_scale: Tensor, out_zero: Tensor,
                      out_grid_stride: int, out_range: list[float], out_rowsum: bool,
                      tma: bool) -> tuple[Tensor, Tensor]:
    m, n = x.shape[0], codes.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=torch.int8)
    sums = torch.zeros((m if out_rowsum else 0,), device=x.device, dtype=torch.int32)
    _launch_linear(x, codes, bits, k, scale, zero, col_sum, bias, rows, grid_stride, act_scale, act_zero, rowsum, zw,
                   True, out, activation, (out_scale, out_zero, out_grid_stride, out_range), sums if out_rowsum else None,
                   tma)
    return out, sums


def _run_conv(x: Tensor, codes: Tensor, bits: int, k: int, scale: Tensor, zero: Tensor, col_sum: Tensor,
              bias: Tensor | None, geometry: list[int], grid_stride: int, act_scale: Tensor, act_zero: Tensor,
              zw: bool, integer: bool, out_dtype: torch.dtype) -> Tensor:
    """The convolution's output ``(B, H_out, W_out, N)``; ``geometry`` = kh, kw, stride h / w, padding h / w."""
    kh, kw, sh, sw, ph, pw = geometry
    b, c, h, wd = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    n, m = codes.shape[0], b * ho * wo
    out = torch.empty((b, ho, wo, n), device=x.device, dtype=out_dtype)
    if m > 0:
        _conv_tuned[_grid(m, n)](
            x, codes, out, bias if bias is not None else scale, act_scale, act_zero, scale, zero, col_sum,
            m, n, k, c, h, wd, ho, wo, grid_stride, x.stride(0), x.stride(2), x.stride(3), codes.stride(0), n,
            sh, sw, ph, pw, _bucket(m), KH=kh, KW=kw, W4=bits == 4, INTEGER=integer, ZW=zw,
            HAS_BIAS=bias is not None, EVEN_K=_even_k(c))
    return out


def _conv_shape(x: Tensor, codes: Tensor, geometry: list[int]) -> tuple[int, int, int, int]:
    kh, kw, sh, sw, ph, pw = geometry
    return (x.shape[0], (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1, codes.shape[0])


# torch.compile does not trace into the kernels: they are custom operators with their output shapes as fake
# implementations (tracing user Triton kernels with an autotuner's pruning function failed in torch 2.11 with an
# AssertionError building an AttrSource)
if AVAILABLE:
    _linear_op = torch.library.custom_op("gaq::triton_linear", _run_linear, mutates_args=(), schema=(
        "(Tensor x, Tensor codes, int bits, int k, Tensor scale, Tensor zero, Tensor col_sum, Tensor? bias, int rows, "
        "int grid_stride, Tensor act_scale, Tensor act_zero, Tensor? rowsum, bool zw, bool integer, "
        "ScalarType out_dtype, bool tma) -> Tensor"))
    _linear_op.register_fake(lambda x, codes, *args: x.new_empty((x.shape[0], codes.shape[0]), dtype=args[-2]))
    _linear_codes_op = torch.library.custom_op("gaq::triton_linear_codes", _run_linear_codes, mutates_args=(), schema=(
        "(Tensor x, Tensor codes, int bits, int k, Tensor scale, Tensor zero, Tensor col_sum, Tensor? bias, int rows, "
        "int grid_stride, Tensor act_scale, Tensor act_zero, Tensor? rowsum, bool zw, int activation, "
        "Tensor out_scale, Tensor out_zero, int out_grid_stride, float[] out_range, bool out_rowsum, bool tma) -> "
        "(Tensor, Tensor)"))
    _linear_codes_op.register_fake(lambda x, codes, *args: (
        x.new_empty((x.shape[0], codes.shape[0]), dtype=torch.int8),
        x.new_empty((x.shape[0] if args[-2] else 0,), dtype=torch.int32)))
    _conv_op = torch.library.custom_op("gaq::triton_conv2d", _run_conv, mutates_args=(), schema=(
        "(Tensor x, Tensor codes, int bits, int k, Tensor scale, Tensor zero, Tensor col_sum, Tensor? bias, "
        "int[] geometry, int grid_stride, Tensor act_scale, Tensor act_zero, bool zw, bool integer, "
        "ScalarType out_dtype) -> Tensor"))
    _conv_op.register_fake(lambda x, codes, bits, k, scale, zero, col_sum, bias, geometry, *args: x.new_empty(
        _conv_shape(x, codes, geometry), dtype=args[-1]))


def linear(x: Tensor, w: GemmWeights, bias: Tensor | None, rows: int, act: tuple[Tensor, Tensor] | None,
           out_dtype: torch.dtype, rowsum: Tensor | None = None, tma: bool = False) -> Tensor:
    """``y = x_hat @ w_hat^T + bias`` ``(M, N)`` in one kernel.

    Args:
        x: with ``act``: int8 codes ``a`` ``(M, K)`` of the input rows (last dimension contiguous); sample ``i``
            owns rows ``i*rows ... (i+1)*rows-1``; without: float rows, multiplied in their own dtype.
        w: the weight (:func:`gemm_weights`).
        bias: float32 ``(N,)`` or None.
        act: ``(scale, row_zero)`` of the input grid: float32 ``s_x`` and int32 ``zx`` per sample (length B or
            1), or None for weight-only mode.
        out_dtype: the output dtype.
        rowsum: int32 ``rowsum(a)`` ``(M,)`` where the caller has it (8-bit weights with a zero point need it;
            computed here otherwise).
        tma: run the persistent TMA kernel where the call qualifies (int8 activations and int8 weight codes, 16-byte
            aligned rows, :func:`tma_ready`); the pointer kernel otherwise.
    """
    x, batch, (p_s, p_zx), stride, zw, rowsum = _linear_args(x, w, rows, act, rowsum)
    run = _linear_op if torch.compiler.is_compiling() else _run_linear
    return run(x, w.codes, w.bits, w.k, w.scale, w.zero, w.col_sum, bias, max(1, rows), stride, p_s, p_zx,
               rowsum if zw else None, zw, act is not None, out_dtype, tma)


def _linear_args(x: Tensor, w: GemmWeights, rows: int, act: tuple[Tensor, Tensor] | None, rowsum: Tensor | None):
    """The checked input rows of :func:`linear` / :func:`linear_codes`, the batch, the input grid's pointers and
    stride, whether the weights' zero points need row sums, and the row sums (computed where needed and not given)."""
    _check_device(x)
    m, k = x.shape[0], w.k
    check(x.ndim == 2 and x.shape[1] == k, f"linear input of shape {tuple(x.shape)} for K={k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    batch = max(1, m // max(1, rows))
    grid, stride = _grid_args(x, batch, act, w)
    zw = act is not None and not w.zero_free
    if zw and rowsum is None:
        rowsum = x.sum(dim=1, dtype=torch.int32)
    return x, batch, grid, stride, zw, rowsum


def linear_codes(x: Tensor, w: GemmWeights, bias: Tensor | None, rows: int, act: tuple[Tensor, Tensor],
                 activation: str, out_grid: tuple[Tensor, Tensor, int, int, int], out_rowsum: bool,
                 rowsum: Tensor | None = None, tma: bool = False) -> tuple[Tensor, Tensor | None]:
    """The next layer's int8 input codes of ``activation(x_hat @ w_hat^T + bias)``, in one kernel: the integer GEMM of
    :func:`linear`, its epilogue applying ``activation`` (:data:`ACTIVATIONS`) in float32 and quantizing with the
    next layer's grid, so the float output never reaches memory.

    Args:
        x, w, bias, rows, act, rowsum, tma: as :func:`linear`'s (int8 activations only).
        activation: a key of :data:`ACTIVATIONS`.
        out_grid: ``(scale, zero, qmin, qmax, offset)`` of the next layer's input quantizer (per sample or one, as
            ``act``): codes ``clamp(round(y / s) + z, qmin, qmax) - offset``.
        out_rowsum: also return the int32 row sums of the codes (what 8-bit weights with a zero point need).

    Returns:
        int8 codes ``(M, N)`` and their row sums ``(M,)`` (None without ``out_rowsum``).
    """
    check(activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    x, batch, (p_s, p_zx), stride, zw, rowsum = _linear_args(x, w, rows, act, rowsum)
    o_scale, o_zero, o_min, o_max, o_off = out_grid
    o_stride = 1 if per_sample_grid(o_scale, batch) else 0
    run = _linear_codes_op if torch.compiler.is_compiling() else _run_linear_codes
    codes, sums = run(x, w.codes, w.bits, w.k, w.scale, w.zero, w.col_sum, bias, max(1, rows), stride, p_s, p_zx,
                      rowsum if zw else None, zw, ACTIVATIONS[activation], o_scale.float().contiguous(),
                      o_zero.float().contiguous(), o_stride, [float(o_min), float(o_max), float(o_off)], out_rowsum,
                      tma)
    return codes, sums if out_rowsum else None


def conv2d(x: Tensor, w: GemmWeights, kernel_size: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int], bias: Tensor | None, act: tuple[Tensor, Tensor] | None,
           out_dtype: torch.dtype) -> Tensor:
    """A convolution (groups 1, dilation 1, zero padding) in one implicit-GEMM kernel.

    Args:
        x: ``(B, C, H, W)`` with channels contiguous (channels-last strides; a channel slice of a channels-last
            tensor is fine): with ``act`` its int8 codes, without a float input (as :func:`linear`'s).
        w: the weight, reduction in ``(kh, kw, c)`` order.
        act: as :func:`linear`'s, or None for weight-only mode.

    Returns:
        ``(B, N, H_out, W_out)`` in ``out_dtype`` with channels-last strides.
    """
    _check_device(x)
    b, c = x.shape[:2]
    check(kernel_size[0] * kernel_size[1] * c == w.k, f"conv input of {c} channels and kernel {kernel_size} for K={w.k}")
    if w.bits == 4 and c % 2:  # a (kh, kw) segment would start on an odd index: unpack (only tiny stem layers)
        w = as_int8(w)
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    (p_s, p_zx), gstride = _grid_args(x, b, act, w)
    geometry = [*kernel_size, *stride, *padding]
    run = _conv_op if torch.compiler.is_compiling() else _run_conv
    out = run(x, w.codes, w.bits, w.k, w.scale, w.zero, w.col_sum, bias, geometry, gstride, p_s, p_zx,
              act is not None and not w.zero_free, act is not None, out_dtype)
    return out.permute(0, 3, 1, 2)


__all__ = ["ACTIVATIONS", "AVAILABLE", "GEMM_SHAPES", "INTERPRET", "GemmWeights", "as_int8", "conv2d", "gemm_weights", "int4_foldable",
           "linear", "linear_codes", "unpacked"]
