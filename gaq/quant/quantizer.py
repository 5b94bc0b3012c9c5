"""Uniform affine quantizers: the MSE weight-range search and the activation quantizer.

Integer grid: asymmetric ``q in [0, 2^b - 1]`` with ``x_hat = (q - z) * s``; symmetric
``q in [-2^(b-1), 2^(b-1) - 1]`` with ``z = 0``. As in BRECQ / Q-Diffusion / TFMQ-DM.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from gaq.errors import GaqError, check
from gaq.quant.config import WeightRangeConfig
from gaq.quant.step_context import StepContext, one_or_per_sample

#: Smallest step size (the peers' ``1e-8`` floor): a constant channel or an all-zero tensor still
#: gets a valid grid.
MIN_SCALE = 1e-8


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient."""
    return (x.round() - x).detach() + x


def round_nearest(x: Tensor) -> Tensor:
    """Round half up, ``floor(x) + [frac(x) >= 0.5]`` (AdaRound's hard rounding of its initial state)."""
    f = torch.floor(x)
    return f + (x - f >= 0.5).to(x.dtype)


def asym_grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Step size and zero point of an asymmetric ``bits``-bit grid spanning ``[lo, hi]`` (elementwise)."""
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(MIN_SCALE)
    return scale, torch.round(-lo / scale)


def weight_range(w: Tensor, bits: int, cfg: WeightRangeConfig) -> tuple[Tensor, Tensor]:
    """Per-row step size and zero point of an asymmetric ``bits``-bit grid for the rows of ``w``.

    Args:
        w: ``(R, K)`` weight rows (one row = one output channel, or one output channel's input-channel
            group when the input is split).
        bits: weight bits.
        cfg: ``mse``: among candidate ranges ``(1 - i * shrink) * [min, max]``, ``i < grid``, the one with
            the least mean ``|w - w_hat|^p`` per row (``w_hat`` rounded with ``torch.round`` as the peers
            do; first candidate on ties, as the peers' strict ``<``),
            computed for all rows and candidates in one batched pass (chunked over rows to bound memory);
            ``minmax``: the row's min and max.

    Returns:
        ``(scale, zero_point)``, each ``(R,)`` in ``w``'s dtype.
    """
    w = w.detach()
    x_min, x_max = w.amin(dim=1), w.amax(dim=1)
    if cfg.method == "minmax":
        return asym_grid(x_min, x_max, bits)
    factors = 1.0 - torch.arange(cfg.grid, device=w.device, dtype=w.dtype) * cfg.shrink  # (G,)
    lo, hi = factors[:, None] * x_min[None, :], factors[:, None] * x_max[None, :]  # (G, R)
    scale, zp = asym_grid(lo, hi, bits)
    qmax = 2**bits - 1
    rows = max(1, cfg.chunk_elements // max(1, cfg.grid * w.shape[1]))
    errors = []
    for r0 in range(0, w.shape[0], rows):
        wc = w[None, r0:r0 + rows, :]  # (1, r, K)
        s, z = scale[:, r0:r0 + rows, None], zp[:, r0:r0 + rows, None]  # (G, r, 1)
        err = (wc / s).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(wc)  # w_hat - w, in place
        errors.append(err.abs_().pow_(cfg.norm_p).mean(dim=2))  # (G, r)
    best = torch.cat(errors, dim=1).argmin(dim=0)  # (R,)
    idx = best[None, :]
    return scale.gather(0, idx)[0], zp.gather(0, idx)[0]


class ActQuantizer(nn.Module):
    """Per-tensor uniform quantizer of an activation, with optional per-step scales.

    Ranges come from a running min/max (exponential moving average, first observation taken as is)
    while :attr:`observing`; the step size and zero point follow from the range (which is widened
    to include 0). With ``num_steps > 1`` every quantity has one entry per calibrated sampling step
    and each sample uses the entry of its own step, read from the shared :class:`StepContext`.

    Buffers (all ``(S,)``, S = ``num_steps``, present from construction):
        x_min, x_max: running range; count: batches observed per step; zero_point.
    ``scale`` is a buffer, or an ``nn.Parameter`` with ``learn_step`` (LSQ-style learned step size,
    straight-through rounding).

    Attributes:
        enabled: quantize in forward (else identity).
        observing: update the running range in forward.
        ready: the range has been calibrated (or loaded); forward with ``enabled`` needs it.
        name: the module path, for messages.
    """

    def __init__(self, bits: int, *, symmetric: bool = False, num_steps: int = 1, learn_step: bool = False,
                 momentum: float = 0.95, context: StepContext | None = None, name: str = "",
                 device: torch.device | str | None = None):
        super().__init__()
        check(num_steps == 1 or (context is not None and context.num_steps == num_steps),
              "per-step activation scales need a step context with the same number of steps")
        self.bits, self.symmetric, self.num_steps = int(bits), bool(symmetric), int(num_steps)
        self.learn_step, self.momentum = bool(learn_step), float(momentum)
        self.context, self.name = context, name
        self.enabled, self.observing, self.ready = False, False, False
        for buf in ("x_min", "x_max", "count", "zero_point"):
            self.register_buffer(buf, torch.zeros(num_steps, device=device))
        if learn_step:
            self.scale = nn.Parameter(torch.ones(num_steps, device=device))
        else:
            self.register_buffer("scale", torch.ones(num_steps, device=device))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, steps={self.num_steps}, "
                f"learn_step={self.learn_step}, enabled={self.enabled}")

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded range is calibrated if it saw any data
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = bool(self.count.sum() > 0)

    # ----- ranges -----
    def reset_observer(self) -> None:
        """Forget the running range (start a new calibration)."""
        with torch.no_grad():
            self.x_min.zero_()
            self.x_max.zero_()
            self.count.zero_()
        self.ready = False

    @torch.no_grad()
    def refresh_scale(self) -> None:
        """Recompute ``scale`` / ``zero_point`` from the running range (after observing or syncing)."""
        lo, hi = self.x_min.clamp(max=0), self.x_max.clamp(min=0)
        if self.symmetric:
            scale = (torch.maximum(-lo, hi) / self.qmax).clamp_min(MIN_SCALE)
            zp = torch.zeros_like(scale)
        else:
            scale, zp = asym_grid(lo, hi, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def _steps(self, batch: int) -> Tensor:
        ctx = self.context
        step = None if ctx is None else ctx.step_index
        if step is None:
            raise GaqError(f"activation quantizer {self.name or '<unnamed>'} has per-step scales but no step is set: "
                           "call the root model (its timestep sets the step) or gaq.quant.set_step_index first")
        check(one_or_per_sample(step.shape[0], batch),
              f"activation quantizer {self.name}: {step.shape[0]} step indices for a batch of {batch}")
        return step

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the running min/max with ``x`` (batch first); per step when ``num_steps > 1``."""
        x = x.detach().float()
        S = self.num_steps
        if S == 1:
            bmin, bmax = x.amin().reshape(1), x.amax().reshape(1)
            present = torch.ones(1, dtype=torch.bool, device=x.device)
        else:
            step = self._steps(x.shape[0]).to(x.device)
            if step.shape[0] == 1:
                step = step.expand(x.shape[0])
            smin, smax = x.flatten(1).amin(dim=1), x.flatten(1).amax(dim=1)
            bmin = torch.full((S,), float("inf"), device=x.device).scatter_reduce(0, step, smin, "amin")
            bmax = torch.full((S,), float("-inf"), device=x.device).scatter_reduce(0, step, smax, "amax")
            present = torch.zeros(S, device=x.device).scatter_add(0, step, torch.ones_like(smin)) > 0
        bmin, bmax = bmin.to(self.x_min.dtype), bmax.to(self.x_max.dtype)
        seen = self.count > 0
        m = self.momentum
        new_min = torch.where(seen, m * self.x_min + (1 - m) * bmin, bmin)
        new_max = torch.where(seen, m * self.x_max + (1 - m) * bmax, bmax)
        self.x_min.copy_(torch.where(present, new_min, self.x_min))
        self.x_max.copy_(torch.where(present, new_max, self.x_max))
        self.count.add_(present.to(self.count.dtype))
        self.refresh_scale()

    @torch.no_grad()
    def fill_unobserved(self, policy: str) -> int:
        """Give steps never observed the range of the observed step nearest in timestep.

        Returns the number of steps filled; raises :class:`GaqError` with ``policy == 'error'`` when a
        step is missing. A quantizer that observed nothing at all is left as is (returns -1).
        """
        seen = self.count > 0
        n_seen = int(seen.sum())
        if n_seen == 0:
            return -1
        if n_seen == self.num_steps:
            return 0
        missing = self.num_steps - n_seen
        check(policy != "error", f"activation quantizer {self.name}: {missing} of {self.num_steps} calibrated steps "
              "never appeared in the calibration batches; calibrate on every step or set act_unobserved_steps: nearest")
        ts = self.context.timesteps.to(self.x_min.device)
        dist = (ts[:, None] - ts[None, :]).abs()
        dist[:, ~seen] = float("inf")
        nearest = dist.argmin(dim=1)
        self.x_min.copy_(self.x_min[nearest])
        self.x_max.copy_(self.x_max[nearest])
        self.refresh_scale()
        return missing

    # ----- forward -----
    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.num_steps == 1:
            return self.scale, self.zero_point
        step = self._steps(x.shape[0]).to(self.scale.device)
        shape = (step.shape[0],) + (1,) * (x.ndim - 1)
        return self.scale[step].view(shape), self.zero_point[step].view(shape)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (batch first); identity unless :attr:`enabled`."""
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        if not (self.ready or self.observing):
            raise GaqError(f"activation quantizer {self.name or '<unnamed>'} is not calibrated: "
                           "run gaq.quant.calibrate_activations before enabling activation quantization")
        scale, zp = self._grid(x)
        if self.learn_step:  # a learned step must stay a valid step
            scale = scale.clamp_min(MIN_SCALE)
        scale, zp = scale.to(x.dtype), zp.to(x.dtype)
        q = torch.clamp(round_ste(x / scale) + zp, self.qmin, self.qmax)
        return (q - zp) * scale


class SplitActQuantizer(nn.Module):
    """Quantizes the channel groups of a concatenated input separately (Q-Diffusion's shortcut split).

    ``forward(x)`` with ``x`` of shape ``(B, sum(sizes), ...)`` equals
    ``cat([parts[i](x_i)], dim=1)`` over the groups ``x_i = x.split(sizes, dim=1)``.
    """

    def __init__(self, sizes: Sequence[int], parts: Sequence[ActQuantizer]):
        super().__init__()
        check(len(sizes) == len(parts) >= 2 and all(s > 0 for s in sizes), "a split needs >= 2 positive channel groups")
        self.sizes = tuple(int(s) for s in sizes)
        self.parts = nn.ModuleList(parts)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"

    def forward(self, x: Tensor) -> Tensor:
        check(x.shape[1] == sum(self.sizes), f"split quantizer expects {sum(self.sizes)} channels, got {x.shape[1]}")
        return torch.cat([q(c) for q, c in zip(self.parts, x.split(self.sizes, dim=1))], dim=1)
