"""Attention with quantized operands in one Triton kernel: integer scores, exact softmax, quantized probabilities.

The fake-quantized attention (:class:`gaq.quant.QuantAttnProcessor`) computes, per sample ``i`` with its
(per-step) grids ``(s, z)`` of the query, key, value and softmax quantizers::

    q_hat = (c_q - z_q) * s_q,   c_q = clamp(round(q / s_q) + z_q)       (k_hat, v_hat alike)
    P     = softmax(q_hat @ k_hat^T * scale)
    P_hat = (c_p - z_p) * s_p,   c_p = clamp(round(P / s_p) + z_p)
    out   = P_hat @ v_hat

As three matmuls and four elementwise passes (with the ``(B, L, H, D) -> (B, H, L, D)`` transposes) that cost
a deployed DiT-XL/2 about 8 ms per call at batch 64 on an H200. Here the projections hand over int8 codes
``a = c - offset`` (their GEMMs quantize in the epilogue, :func:`gaq.deploy.triton_kernels.linear_codes`), and
one program takes ``BLOCK_M`` queries of one (sample, head):

- a first small kernel sums each key's codes over the head dim and the value codes over the keys, so the
  main kernel's key and value tiles feed only its MMAs (loaded straight to shared memory, fewer registers);
- scores on the int8 tensor cores, exact in int32: with ``o = offset - z``,
  ``sum_d (c_q - z_q)(c_k - z_k) = a_q.a_k + o_k * sum_d a_q + o_q * sum_d a_k + D * o_q * o_k``;
- the exact softmax: where a block of keys holds the whole row (autotuned blocks up to 256 keys) one pass;
  else a first pass takes the row maxima and sums of ``exp`` and a second recomputes the scores;
- the probability codes ``c_p`` (half-to-even rounding of ``exp(s - max) / (sum * s_p)``), and
  ``P_hat @ v_hat`` again on the int8 tensor cores with ``u = c_p - 128``:
  ``sum_k (c_p - z_p)(c_v - z_v) = u.a_v + o_v * sum_k u + (128 - z_p) * sum_k a_v + N * (128 - z_p) * o_v``
  (a padded key has ``c_p = z_p``: it adds nothing);
- the output ``(B, L_q, H * D)`` in the compute dtype, the output projection's input.

Measured on an H200 (``bench/results/deploy/h200_dit_fused.md``) before the sums kernel, it was slower than the
explicit form (16.3 against about 8 ms per DiT-XL/2 call), so ``deploy.attention_kernel`` defaults to ``explicit``.

The result equals the fake-quantized attention up to float32 rounding of the softmax: ``exp2`` and one
division per row instead of ``exp`` and one per probability can move a probability across a grid boundary
(rare; one code). Integer sums stay below 2^31 for up to :data:`MAX_KEYS` keys.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gaq.deploy.triton_kernels import INTERPRET
from gaq.errors import check

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU installs without triton: the explicit attention runs instead
    triton, tl, AVAILABLE = None, None, False

#: Largest operand grid (bits) whose codes fit int8 with an offset, largest head dim, most keys (int32 sums).
MAX_BITS, MAX_HEAD_DIM, MAX_KEYS = 8, 256, 16384
#: Keys per block of the pass that sums the key and value codes.
SUMS_BLOCK = 64


if AVAILABLE:
    from gaq.deploy.triton_quant import _round_half_even

    @triton.jit
    def _sums_kernel(k_ptr, v_ptr, ksum_ptr, vsum_ptr, H, LK, D, stride_kb, stride_kh, stride_kl, stride_vb,
                     stride_vh, stride_vl, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """Per (sample, head): each key's code sum over the head dim, and the value codes' sums over the keys."""
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        rd = tl.arange(0, BLOCK_D)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
        v_sum = tl.zeros((BLOCK_D,), dtype=tl.int32)
        for l0 in range(0, LK, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)
            mask = (rl[:, None] < LK) & (rd[None, :] < D)
            k = tl.load(k_base + rl[:, None] * stride_kl + rd[None, :], mask=mask, other=0)
            tl.store(ksum_ptr + bh.to(tl.int64) * LK + rl, tl.sum(k.to(tl.int32), axis=1), mask=rl < LK)
            v = tl.load(v_base + rl[:, None] * stride_vl + rd[None, :], mask=mask, other=0)
            v_sum += tl.sum(v.to(tl.int32), axis=0)
        tl.store(vsum_ptr + bh.to(tl.int64) * D + rd, v_sum, mask=rd < D)

    @triton.jit
    def _scores(q, q_sum, k_base, ksum_base, n0, rd, stride_kl, LK, D, o_q, o_k, qk_scale, BLOCK_N: tl.constexpr):
        """Scores ``(BLOCK_M, BLOCK_N)`` of keys ``n0 ...`` times ``log2(e)``, float32; ``-inf`` past ``LK``. The key
        tile feeds only the MMA (its sums come from :func:`_sums_kernel`), so it goes to shared memory directly."""
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < LK
        k = tl.load(k_base + rn[:, None] * stride_kl + rd[None, :], mask=mask_n[:, None] & (rd[None, :] < D), other=0)
        k_sum = tl.load(ksum_base + rn, mask=mask_n, other=0)
        acc = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        acc = acc + o_k * q_sum[:, None] + o_q * k_sum[None, :] + D * o_q * o_k
        return tl.where(mask_n[None, :], acc.to(tl.float32) * qk_scale, float("-inf"))

    @triton.jit
    def _probs_times_values(s, m, inv, acc, u_sum, v_base, n0, rd, stride_vl, LK, D, z_p, pmin, pmax,
                            BLOCK_N: tl.constexpr):
        """Adds the block's ``u @ a_v`` to ``acc`` and the row sums of ``u``; ``inv`` = ``1 / (row sum * s_p)``."""
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < LK
        c = tl.minimum(tl.maximum(_round_half_even(tl.exp2(s - m[:, None]) * inv[:, None]) + z_p, pmin), pmax)
        u = (tl.where(mask_n[None, :], c, z_p) - 128.0).to(tl.int8)
        v = tl.load(v_base + rn[:, None] * stride_vl + rd[None, :], mask=mask_n[:, None] & (rd[None, :] < D), other=0)
        acc = tl.dot(u, v, acc, out_dtype=tl.int32)
        return acc, u_sum + tl.sum(u.to(tl.int32), axis=1)

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, grid_ptr, ksum_ptr, vsum_ptr, H, LQ, LK, D, sm_scale,
                          stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                          stride_vb, stride_vh, stride_vl, stride_ob, stride_ol, pmin, pmax, lk_bucket,
                          ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        g = grid_ptr + b * 8  # per sample: s_q, o_q, s_k, o_k, s_v, o_v, s_p, z_p (o = offset - z)
        s_q, o_q = tl.load(g), tl.load(g + 1).to(tl.int32)
        s_k, o_k = tl.load(g + 2), tl.load(g + 3).to(tl.int32)
        s_v, o_v = tl.load(g + 4), tl.load(g + 5).to(tl.int32)
        s_p, z_p = tl.load(g + 6), tl.load(g + 7)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        mask_m = rm < LQ
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + rm[:, None] * stride_ql + rd[None, :],
                    mask=mask_m[:, None] & (rd[None, :] < D), other=0)
        q_sum = tl.sum(q.to(tl.int32), axis=1)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
        ksum_base = ksum_ptr + bh.to(tl.int64) * LK
        qk_scale = s_q * s_k * sm_scale * 1.4426950408889634  # log2(e): the softmax in exp2
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.int32)
        u_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        if ONE_PASS:  # the whole row in one block
            s = _scores(q, q_sum, k_base, ksum_base, 0, rd, stride_kl, LK, D, o_q, o_k, qk_scale, BLOCK_N)
            m = tl.max(s, axis=1)
            inv = 1.0 / (tl.sum(tl.exp2(s - m[:, None]), axis=1) * s_p)
            acc, u_sum = _probs_times_values(s, m, inv, acc, u_sum, v_base, 0, rd, stride_vl, LK, D, z_p, pmin, pmax,
                                             BLOCK_N)
            n_total = BLOCK_N
        else:
            m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            total = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for n0 in range(0, LK, BLOCK_N):  # pass 1: row maxima and sums of exp
                s = _scores(q, q_sum, k_base, ksum_base, n0, rd, stride_kl, LK, D, o_q, o_k, qk_scale, BLOCK_N)
                m_new = tl.maximum(m, tl.max(s, axis=1))
                total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
                m = m_new
            inv = 1.0 / (total * s_p)
            for n0 in range(0, LK, BLOCK_N):  # pass 2: the probability codes times the value codes
                s = _scores(q, q_sum, k_base, ksum_base, n0, rd, stride_kl, LK, D, o_q, o_k, qk_scale, BLOCK_N)
                acc, u_sum = _probs_times_values(s, m, inv, acc, u_sum, v_base, n0, rd, stride_vl, LK, D, z_p, pmin,
                                                 pmax, BLOCK_N)
            n_total = tl.cdiv(LK, BLOCK_N) * BLOCK_N
        o_p = (128.0 - z_p).to(tl.int32)
        v_sum = tl.load(vsum_ptr + bh.to(tl.int64) * D + rd, mask=rd < D, other=0)
        acc = acc + o_v * u_sum[:, None] + o_p * v_sum[None, :] + n_total * o_p * o_v
        out = acc.to(tl.float32) * (s_p * s_v)
        o = o_ptr + b.to(tl.int64) * stride_ob + rm[:, None] * stride_ol + h * D + rd[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & (rd[None, :] < D))


#: Autotune candidates ``(BLOCK_M, BLOCK_N, warps, stages)``: a block of keys at least as long as the row makes the
#: kernel one-pass (``ONE_PASS``), shorter blocks two-pass; the interpreter runs one small configuration.
ATTENTION_CONFIGS = [(64, 256, 8, 1), (128, 256, 8, 1), (64, 256, 4, 1), (32, 256, 4, 1), (64, 64, 4, 2),
                     (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2)]


def _prune_attention(configs, named_args, **kwargs):
    """Drop the candidates whose key block exceeds twice the (bucketed) row: they only compute padding."""
    lk = named_args["lk_bucket"]
    return [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, 2 * lk)] or configs[-1:]


if AVAILABLE:
    _candidates = [(16, 32, 4, 1)] if INTERPRET else ATTENTION_CONFIGS
    _attention_tuned = triton.autotune(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in _candidates],
        key=["lk_bucket", "LQ", "D"], prune_configs_by={"early_config_prune": _prune_attention})(
        triton.heuristics({"ONE_PASS": lambda a: a["BLOCK_N"] >= a["LK"]})(_attention_kernel))


def _run(q: Tensor, k: Tensor, v: Tensor, grids: Tensor, sm_scale: float, pmin: int, pmax: int,
         out_dtype: torch.dtype) -> Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty((b, lq, h * d), device=q.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    k_sum = torch.empty((b * h, lk), device=q.device, dtype=torch.int32)
    v_sum = torch.empty((b * h, d), device=q.device, dtype=torch.int32)
    _sums_kernel[(b * h,)](k, v, k_sum, v_sum, h, lk, d, k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                           v.stride(1), v.stride(2), BLOCK_L=SUMS_BLOCK, BLOCK_D=max(32, triton.next_power_of_2(d)))
    _attention_tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)](
        q, k, v, out, grids, k_sum, v_sum, h, lq, lk, d, float(sm_scale), q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        float(pmin), float(pmax), max(16, triton.next_power_of_2(lk)), BLOCK_D=max(32, triton.next_power_of_2(d)))
    return out


# a custom operator, as the GEMMs of gaq.deploy.triton_kernels are, so torch.compile keeps the kernel whole
if AVAILABLE:
    _attention_op = torch.library.custom_op("gaq::triton_attention", _run, mutates_args=(), schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor grids, float sm_scale, int pmin, int pmax, ScalarType out_dtype) "
        "-> Tensor"))
    _attention_op.register_fake(lambda q, k, v, grids, sm_scale, pmin, pmax, out_dtype: q.new_empty(
        (q.shape[0], q.shape[2], q.shape[1] * q.shape[3]), dtype=out_dtype))


def supported(head_dim: int, keys: int, bits: tuple[int, ...]) -> bool:
    """Whether :func:`attention` covers operands of this head dim, key count and grid bits (the device is the
    caller's to check)."""
    return AVAILABLE and head_dim <= MAX_HEAD_DIM and keys <= MAX_KEYS and max(bits) <= MAX_BITS


def attention(q: Tensor, k: Tensor, v: Tensor, grids: Tensor, sm_scale: float, prob_range: tuple[int, int],
              out_dtype: torch.dtype) -> Tensor:
    """Quantized attention of int8 operand codes in one kernel (see the module docstring).

    Args:
        q, k, v: int8 codes ``a = c - offset`` ``(B, H, L, D)``, any strides with the head dim contiguous (the
            projections' ``(B, L, H * D)`` codes viewed per head); keys and values of one length.
        grids: float32 ``(B, 8)``: per sample ``s_q, o_q, s_k, o_k, s_v, o_v, s_p, z_p`` with ``o = offset - z``.
        sm_scale: the scores' scale (``attn.scale``).
        prob_range: ``(qmin, qmax)`` of the softmax grid (within ``[0, 255]``).
        out_dtype: the output's dtype.

    Returns:
        ``(B, L_q, H * D)`` in ``out_dtype``.
    """
    check(all(t.dtype == torch.int8 and t.ndim == 4 and t.stride(-1) == 1 for t in (q, k, v)),
          "attention takes int8 codes (B, H, L, D) with the head dim contiguous")
    check(k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1],
          f"attention operands of shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check(grids.shape == (q.shape[0], 8) and grids.dtype == torch.float32,
          f"attention grids must be float32 (B, 8), got {tuple(grids.shape)} {grids.dtype}")
    check(0 <= prob_range[0] <= prob_range[1] <= 255, f"softmax grid {prob_range} outside [0, 255]")
    run = _attention_op if torch.compiler.is_compiling() else _run
    return run(q, k, v, grids.contiguous(), float(sm_scale), int(prob_range[0]), int(prob_range[1]), out_dtype)


__all__ = ["ATTENTION_CONFIGS", "AVAILABLE", "MAX_BITS", "MAX_HEAD_DIM", "MAX_KEYS", "attention", "supported"]
