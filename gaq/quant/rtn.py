"""Round-to-nearest PTQ: MSE-searched weight ranges with nearest rounding, EMA activation ranges."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from gaq.errors import check
from gaq.quant.act_calib import calibrate_activations
from gaq.quant.config import QuantConfig, resolve_config
from gaq.quant.wrap import iter_act_quantizers, quantize, set_quant_state, set_rounding_mode


def timesteps_from_batches(batches: list[Mapping]) -> Tensor:
    """The timestep of every step ``0..S-1`` seen in calibration batches (``step`` and ``t`` keys).

    Raises :class:`GaqError` if a step in between is missing or one step has two timesteps.
    """
    steps = torch.cat([torch.as_tensor(b["step"]).reshape(-1).cpu() for b in batches]).long()
    ts = torch.cat([torch.as_tensor(b["t"]).reshape(-1).cpu() for b in batches])
    check(steps.numel() == ts.numel() and steps.numel() > 0, "calibration batches need matching 'step' and 't'")
    num = int(steps.max()) + 1
    table = torch.full((num,), float("nan"), dtype=torch.float64)
    table[steps] = ts.double()
    check(not bool(torch.isnan(table).any()), "calibration batches do not cover every step 0..S-1: pass timesteps=")
    check(bool((table[steps] == ts.double()).all()), "calibration batches give one step two different timesteps")
    return table


def quantize_rtn(fp_model: nn.Module, config: QuantConfig, calib_batches: Iterable[Mapping], *,
                 timesteps: Tensor | None = None) -> nn.Module:
    """Round-to-nearest quantization of ``fp_model`` (a copy; the FP model is untouched).

    Weights: per-channel MSE ranges, nearest rounding. Activations (if ``config.a_bits < 32``):
    running min/max EMA ranges from ``calib_batches`` (dicts ``{"x", "t", "step", "cond"}``).

    Args:
        timesteps: calibrated sampling timesteps for per-step scales; by default read from the
            batches' ``step`` / ``t`` (every step from 0 to the largest must appear).
    """
    batches = list(calib_batches)
    settings = resolve_config(config)
    if timesteps is None and settings.per_step_act and settings.quantize_activations and batches:
        timesteps = timesteps_from_batches(batches)
    qmodel = quantize(fp_model, config, timesteps=timesteps)
    set_rounding_mode(qmodel, "nearest")
    set_quant_state(qmodel, weight=True, act=False)
    if any(True for _ in iter_act_quantizers(qmodel)):
        calibrate_activations(qmodel, batches)
    return qmodel
