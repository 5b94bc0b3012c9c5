"""AdaRound (Nagel et al. 2020) as in BRECQ: a per-output-channel weight quantizer with learned rounding.

``w_hat = (clamp(floor(w / s) + h(alpha) + z, 0, 2^b - 1) - z) * s`` with the rectified sigmoid
``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``. ``alpha`` starts where ``h``
equals the rounding residue ``w / s - floor(w / s)`` (so the soft weight is the FP weight up to the
clamp) and the hard rounding ``h >= 0.5`` (i.e. ``alpha >= 0``) is then exactly nearest rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from gaq.errors import check
from gaq.quant.config import WeightRangeConfig
from gaq.quant.quantizer import round_nearest, weight_range

#: AdaRound's stretch of the sigmoid, ``(gamma, zeta)`` (the paper's and BRECQ's -0.1 / 1.1).
DEFAULT_STRETCH: tuple[float, float] = (-0.1, 1.1)


class AdaRoundQuantizer(nn.Module):
    """Learned-rounding quantizer of one weight tensor (``(C_out, C_in, ...)``).

    Ranges are per output channel, and per input-channel group when ``in_splits`` is given
    (Q-Diffusion's split shortcut: each group's ranges are searched on that group alone).

    Buffers / parameters (present from construction):
        scale, zero_point: ``(C_out, G)``, G = number of input-channel groups (1 without a split).
        alpha: rounding logits, ``nn.Parameter`` of the weight's shape.

    Attributes:
        bits: weight bits.
        in_splits: input-channel group sizes, or None.
        soft: use the soft rounding ``h(alpha)`` (while learning) instead of the hard ``h >= 0.5``.
        mode: ``learned`` (AdaRound) or ``nearest`` (round to nearest, ``alpha`` ignored).
        enabled: quantize in the owning layer's forward (else the FP weight is used).
    """

    def __init__(self, weight: Tensor, bits: int, *, range_cfg: WeightRangeConfig | None = None,
                 in_splits: Sequence[int] | None = None, stretch: tuple[float, float] = DEFAULT_STRETCH,
                 init_range: bool = True):
        super().__init__()
        check(weight.ndim >= 2, "AdaRound quantizes weights with an output and an input dimension")
        self.bits = int(bits)
        self.gamma, self.zeta = float(stretch[0]), float(stretch[1])
        self.in_splits = None if in_splits is None else tuple(int(s) for s in in_splits)
        if self.in_splits is not None:
            check(sum(self.in_splits) == weight.shape[1] and all(s > 0 for s in self.in_splits),
                  f"input split {self.in_splits} does not cover the weight's {weight.shape[1]} input channels")
        self.soft, self.mode, self.enabled = False, "learned", True
        self._cache: tuple | None = None  # (state key, fake-quantized weight); see forward
        groups = 1 if self.in_splits is None else len(self.in_splits)
        c_out = weight.shape[0]
        self.register_buffer("scale", torch.ones(c_out, groups, dtype=weight.dtype, device=weight.device))
        self.register_buffer("zero_point", torch.zeros(c_out, groups, dtype=weight.dtype, device=weight.device))
        self.alpha = nn.Parameter(torch.zeros_like(weight))
        if init_range:
            self.init_range(weight, range_cfg or WeightRangeConfig())
        self.init_alpha(weight)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, in_splits={self.in_splits}, mode={self.mode}, soft={self.soft}"

    def _groups(self, weight: Tensor) -> list[Tensor]:
        """The weight as ``(C_out, K_g)`` rows per input-channel group."""
        parts = [weight] if self.in_splits is None else list(weight.split(self.in_splits, dim=1))
        return [p.reshape(p.shape[0], -1) for p in parts]

    @torch.no_grad()
    def init_range(self, weight: Tensor, cfg: WeightRangeConfig) -> None:
        """Search the per-channel (per group) ranges of ``weight``."""
        for g, rows in enumerate(self._groups(weight)):
            scale, zp = weight_range(rows, self.bits, cfg)
            self.scale[:, g] = scale
            self.zero_point[:, g] = zp

    def expanded(self, ndim: int) -> tuple[Tensor, Tensor]:
        """``scale`` and ``zero_point`` broadcastable to the weight: ``(C_out, C_in or 1, 1, ...)``."""
        s, z = self.scale, self.zero_point
        if self.in_splits is not None:  # one column per input channel, group g repeated in_splits[g] times
            s = torch.cat([s[:, g:g + 1].expand(-1, n) for g, n in enumerate(self.in_splits)], dim=1)
            z = torch.cat([z[:, g:g + 1].expand(-1, n) for g, n in enumerate(self.in_splits)], dim=1)
        shape = (s.shape[0], s.shape[1]) + (1,) * (ndim - 2)
        return s.reshape(shape), z.reshape(shape)

    def rectified_sigmoid(self) -> Tensor:
        """``h(alpha)`` in [0, 1], the weight's shape."""
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    @torch.no_grad()
    def init_alpha(self, weight: Tensor) -> None:
        """Set ``alpha`` so that ``h(alpha)`` is the rounding residue of ``weight`` (and hard = nearest)."""
        s, _ = self.expanded(weight.ndim)
        xs = weight / s
        rest = xs - torch.floor(xs)
        alpha = -torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1)
        tiny = torch.finfo(alpha.dtype).tiny
        # alpha >= 0 must hold exactly where rest >= 0.5 (hard rounding = nearest rounding)
        alpha = torch.where(rest >= 0.5, alpha.clamp(min=0.0), alpha.clamp(max=-tiny))
        self.alpha.copy_(alpha)

    def rtn(self) -> None:
        """Switch to round-to-nearest (``alpha`` ignored)."""
        self.mode, self.soft = "nearest", False

    def learned(self) -> None:
        """Switch to AdaRound's learned rounding."""
        self.mode = "learned"

    def rounding(self, xs: Tensor) -> Tensor:
        """The integer part ``x_int`` of ``xs = w / s`` under the current mode (soft: fractional)."""
        if self.mode == "nearest":
            return round_nearest(xs)
        x_floor = torch.floor(xs)
        if self.soft:
            return x_floor + self.rectified_sigmoid()
        return x_floor + (self.alpha >= 0).to(xs.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        """The fake-quantized weight (soft or hard per :attr:`soft`, or nearest per :attr:`mode`).

        Where no gradient can flow to ``alpha`` (hard or nearest rounding, or grad mode off) the result
        is cached until ``weight``, ``alpha``, ``scale``, ``zero_point`` or the mode change, so
        sampling does not recompute every weight at every step.
        """
        if torch.compiler.is_compiling():  # compiled code recomputes (and fuses) it: no cache lookups to trace
            return self._fake_quant(weight)
        needs_graph = self.soft and self.mode == "learned" and torch.is_grad_enabled()
        cacheable = not needs_graph and not torch.is_inference_mode_enabled()
        key = None
        if cacheable:
            key = (self.mode, self.soft, self.bits) + tuple(
                (t.data_ptr(), t._version, t.device) for t in (weight, self.alpha, self.scale, self.zero_point))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        out = self._fake_quant(weight)
        if cacheable:  # no gradient reaches alpha here, so nothing is lost by detaching
            out = out.detach()
            self._cache = (key, out)
        return out

    def _fake_quant(self, weight: Tensor) -> Tensor:
        s, z = self.expanded(weight.ndim)
        q = torch.clamp(self.rounding(weight / s) + z, 0, self.qmax)
        return (q - z) * s

    @torch.no_grad()
    def integer_codes(self, weight: Tensor) -> Tensor:
        """The hard integer codes of ``weight`` in ``[0, 2^b - 1]``, uint8 of the weight's shape."""
        s, z = self.expanded(weight.ndim)
        soft, self.soft = self.soft, False
        try:
            q = torch.clamp(self.rounding(weight / s) + z, 0, self.qmax)
        finally:
            self.soft = soft
        return q.to(torch.uint8)

    def round_loss(self, beta: float) -> Tensor:
        """AdaRound's regulariser ``sum(1 - |2 h(alpha) - 1|^beta)`` over every rounding variable."""
        return (1 - (2 * self.rectified_sigmoid() - 1).abs().pow(beta)).sum()


def adaround_beta(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """BRECQ's ``LinearTempDecay``: ``start`` during the warm-up, then linear to ``end`` at ``total``."""
    start_decay = warmup * total
    if step < start_decay:
        return float(start)
    rel = (step - start_decay) / max(total - start_decay, 1e-12)
    return float(end + (start - end) * max(0.0, 1.0 - rel))


@dataclass
class BetaSchedule:
    """AdaRound's annealing of the regulariser exponent over ``total`` iterations (BRECQ).

    The regulariser is off during the first ``warmup`` fraction (:meth:`active` is False there),
    then ``beta`` decays linearly from ``start`` to ``end``.
    """

    total: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __call__(self, step: int) -> float:
        return adaround_beta(step, self.total, self.warmup, self.start, self.end)

    def active(self, step: int) -> bool:
        """Whether the rounding regulariser counts at iteration ``step``."""
        return step >= self.warmup * self.total
