"""One call signature for every supported noise predictor.

diffusers' noise predictors differ in argument names and outputs: ``UNet2DModel`` takes
``class_labels``, ``UNet2DConditionModel`` takes ``encoder_hidden_states``, DiT
(``DiTTransformer2DModel`` / ``Transformer2DModel``) takes ``class_labels`` and may predict a learned
variance in the second half of its channels; PixArt (``PixArtTransformer2DModel``) takes
``encoder_hidden_states`` and predicts a learned variance too. Everything in gaq (sampling, calibration-set
generation, reconstruction, evaluation) calls a model through :func:`predict_noise` with a
condition dictionary ``cond`` holding the model's own keyword arguments.

The timestep goes in by keyword (``timestep=``): PixArt's ``PixArtTransformer2DModel`` takes
``encoder_hidden_states`` second. A condition dictionary is flat (one tensor per key, so it can be
indexed, concatenated, moved and stored as it is); a key ``"group.name"`` is the entry ``name`` of
the nested keyword argument ``group``: SDXL-style ``added_cond_kwargs`` are stored as
``added_cond_kwargs.text_embeds`` and ``added_cond_kwargs.time_ids`` (:func:`nest_cond`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


def predict_noise(model: nn.Module, x: Tensor, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
    """Noise prediction ``eps(x_t, t, cond)`` with the same channel count as ``x``.

    Args:
        model: a diffusers noise predictor (or a gaq fake-quantized copy of one).
        x: noisy sample ``x_t``, shape ``(B, C, H, W)``.
        t: timesteps, shape ``(B,)`` (a scalar is broadcast).
        cond: keyword inputs of the model, e.g. ``{"class_labels": (B,)}`` or
            ``{"encoder_hidden_states": (B, L, D)}``; empty or None for unconditional models.
    """
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    out = model(x, timestep=t, **nest_cond(cond or {}), return_dict=False)[0]
    if out.shape[1] != x.shape[1]:  # learned variance (DiT, some DDPMs): keep the noise half
        out = out[:, : x.shape[1]]
    return out


def nest_cond(cond: Mapping[str, Tensor]) -> dict:
    """The model's keyword arguments of a flat condition dictionary: ``{"a.b": v}`` -> ``{"a": {"b": v}}``."""
    out: dict = {}
    for key, value in cond.items():
        group, sep, name = key.partition(".")
        if sep:
            out.setdefault(group, {})[name] = value
        else:
            out[key] = value
    return out


def concat_cond(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Batch-concatenate two condition dictionaries with the same keys."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def index_cond(cond: Mapping[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    """Select the samples ``idx`` of every tensor in a condition dictionary."""
    return {k: v[idx] for k, v in cond.items()}
