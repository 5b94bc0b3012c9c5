"""Loading a noise predictor and its noise schedule from a diffusers hub id or a local folder.

A *source* is what a user writes in a config: a local folder in diffusers' pipeline layout
(``model_index.json`` + ``unet/`` or ``transformer/`` + ``scheduler/``), a folder holding one
model (``config.json`` + weights) and a ``scheduler/`` folder, or a hub id such as
``google/ddpm-cifar10-32``. The shipped default is ``checkpoints/default``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

CondKind = Literal["none", "class", "text"]


@dataclass
class Denoiser:
    """A noise predictor with what sampling and calibration need to know about it.

    Attributes:
        model: the diffusers noise predictor (UNet2DModel, UNet2DConditionModel, DiT), in eval mode.
        alphas_cumprod: the training noise schedule, shape ``(num_train_timesteps,)``.
        sample_shape: ``(C, H, W)`` of one sample the model denoises.
        cond_kind: ``none``, ``class`` (``class_labels``) or ``text`` (``encoder_hidden_states``).
        num_classes: number of real classes for ``class`` models. The null (unconditional) label of
            classifier-free guidance is ``num_classes`` when the model has one more class embedding
            than real classes, else None (the model has no null class).
        null_label: the null class id, or None.
        source: where it came from (folder or hub id), for metadata.
        fingerprint: a short hash of the model's config and weights, used to key caches.
    """

    model: nn.Module
    alphas_cumprod: Tensor
    sample_shape: tuple[int, int, int]
    cond_kind: CondKind = "none"
    num_classes: int | None = None
    null_label: int | None = None
    source: str = "<in-memory>"
    fingerprint: str = field(default="")

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = model_fingerprint(self.model)


def model_fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit hash of a model's config (if any) and all its parameters and buffers."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
