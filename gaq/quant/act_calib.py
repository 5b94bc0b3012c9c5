"""Activation calibration: running min/max (EMA) ranges over calibration batches, per step where configured.

:func:`calibrate_activations` does everything. Under DDP every rank observes the whole calibration set
in the same order, so every rank computes the same ranges (the EMA depends on the batch order, so
shards averaged across ranks would not equal the single-process ranges).
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from gaq.errors import check
from gaq.models.denoiser import predict_noise
from gaq.quant.wrap import iter_act_quantizers, quant_info

log = logging.getLogger(__name__)

def act_observer_buffers(module: nn.Module) -> list[tuple[str, Tensor, Tensor, Tensor]]:
    """``(path, x_min, x_max, count)`` of every activation quantizer under ``module``.

    ``x_min`` / ``x_max`` are the running (EMA) range per step and ``count`` the number of batches
    observed per step (0 = never observed), all ``(S,)`` buffers that may be modified in place.
    """
    return [(name, q.x_min, q.x_max, q.count) for name, q in iter_act_quantizers(module)]


@torch.no_grad()
def finalize_act_calibration(qmodel: nn.Module) -> dict[str, int]:
    """Fill never-observed steps (per the config's ``act_unobserved_steps``), set scales, mark ready.

    Returns ``{"quantizers", "filled_steps", "unreached"}``: how many quantizers, how many per-step
    entries were filled from a neighbour, and how many quantizers saw no data at all (left
    uncalibrated; using them raises :class:`GaqError`).
    """
    policy = quant_info(qmodel).settings.act_unobserved_steps
    filled = unreached = n = 0
    for name, q in iter_act_quantizers(qmodel):
        n += 1
        got = q.fill_unobserved(policy)
        if got < 0:
            unreached += 1
            log.warning("activation quantizer %s saw no calibration data; it stays uncalibrated", name)
            continue
        filled += got
        q.refresh_scale()
        q.ready = True
    if filled:
        log.info("activation calibration: %d per-step entries taken from the nearest observed step", filled)
    return {"quantizers": n, "filled_steps": filled, "unreached": unreached}


def calibrate_activations(qmodel: nn.Module, batches: Iterable[Mapping], *, quantize_while_observing: bool = True,
                          finalize: bool = True) -> dict[str, int]:
    """Set every activation range of ``qmodel`` from calibration batches (running min/max EMA).

    Args:
        qmodel: a model from :func:`gaq.quant.quantize` (weight quantization as the caller left it).
        batches: dicts ``{"x", "t", "step", "cond"}``; the model is called as
            ``predict_noise(qmodel, x, t, cond)`` and per-step quantizers take each sample's step from
            its timestep ``t`` (the nearest calibrated timestep), exactly as at inference.
        quantize_while_observing: quantize activations with the running ranges during the pass, so
            later layers see quantized inputs (TFMQ-DM, Q-Diffusion); False observes FP activations.
        finalize: fill unobserved steps, compute scales and turn activation quantization on (False:
            only observe; :func:`finalize_act_calibration` does the rest).

    Returns:
        ``{"batches", "quantizers", "filled_steps", "unreached"}``.
    """
    quantizers = [q for _, q in iter_act_quantizers(qmodel)]
    if not quantizers:
        return {"batches": 0, "quantizers": 0, "filled_steps": 0, "unreached": 0}
    for q in quantizers:
        q.reset_observer()
        q.observing, q.enabled = True, bool(quantize_while_observing)
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                predict_noise(qmodel, batch["x"], batch["t"], batch.get("cond"))
                seen += 1
    finally:
        for q in quantizers:
            q.observing = False
    check(seen > 0, "activation calibration got no batches: the calibration set is empty")
    out = {"batches": seen, "quantizers": len(quantizers), "filled_steps": 0, "unreached": 0}
    if finalize:
        out.update(finalize_act_calibration(qmodel))
        for q in quantizers:
            q.enabled = q.ready
    return out
