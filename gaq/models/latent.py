"""Latent diffusion: the pipeline's autoencoder turns sampled latents into images.

A latent diffusion pipeline (diffusers' ``LDMPipeline``, ``DiTPipeline``, Stable Diffusion) denoises in
the latent space of an autoencoder (``VQModel`` or ``AutoencoderKL``) kept next to the noise predictor
as the ``vqvae`` or ``vae`` component. gaq calibrates and measures the noise predictor in latent space
(the calibration set holds latents, the per-step error compares latents); only what needs pixels
(sample grids, image metrics) decodes, with :class:`LatentDecoder`:
``images = autoencoder.decode(latents / scaling_factor)``, clamped to [-1, 1].

The scaling factor is the autoencoder config's ``scaling_factor`` unless the model folder's
``gaq.json`` says ``latent_scaling_factor``. CompVis' VQ-f4 LDMs (LSUN, CelebA-HQ, ImageNet cin256)
were trained on unscaled latents (scale 1.0), while diffusers' ``VQModel`` config carries 0.18215
(huggingface/diffusers#6725): such folders need ``"latent_scaling_factor": 1.0``.
"""
from __future__ import annotations

from typing import Literal

import torch
from diffusers import AutoencoderKL, VQModel
from torch import Tensor, nn

from gaq.errors import check

#: autoencoder class -> its key in a pipeline's ``model_index.json`` (as diffusers' own pipelines name it)
AUTOENCODER_COMPONENTS: dict[type[nn.Module], str] = {VQModel: "vqvae", AutoencoderKL: "vae"}
AUTOENCODER_CLASSES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in AUTOENCODER_COMPONENTS}
#: ``gaq.json`` key overriding the autoencoder config's ``scaling_factor``
SCALING_FACTOR_KEY = "latent_scaling_factor"


def autoencoder_component(autoencoder: nn.Module) -> Literal["vqvae", "vae"]:
    """The pipeline key of ``autoencoder``'s class (MRO lookup)."""
    for cls in type(autoencoder).__mro__:
        if cls in AUTOENCODER_COMPONENTS:
            return AUTOENCODER_COMPONENTS[cls]  # type: ignore[return-value]
    raise ValueError(f"not a supported autoencoder: {type(autoencoder).__name__}")


class LatentDecoder(nn.Module):
    """Decodes latents ``(B, C_lat, h, w)`` into images ``(B, C_img, h * f, w * f)`` in [-1, 1].

    Args:
        autoencoder: a diffusers ``VQModel`` (decode quantizes to the codebook first, as LDM's
            ``decode_first_stage`` does) or ``AutoencoderKL``; frozen, eval mode.
        scaling_factor: the latents the noise predictor sees are ``scaling_factor`` times the
            autoencoder's; decoding divides by it.
    """

    def __init__(self, autoencoder: nn.Module, scaling_factor: float):
        super().__init__()
        check(isinstance(autoencoder, tuple(AUTOENCODER_COMPONENTS)),
              f"the latent decoder must be one of {', '.join(AUTOENCODER_CLASSES)}, got {type(autoencoder).__name__}")
        check(float(scaling_factor) > 0, f"latent scaling factor must be > 0, got {scaling_factor}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)

    @property
    def component(self) -> str:
        """Where the autoencoder lives in a pipeline folder (``vqvae`` or ``vae``)."""
        return autoencoder_component(self.autoencoder)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(C, H, W)`` of the decoded image of a latent of shape ``latent_shape``.

        The encoder halves the resolution in every block but the last (diffusers' ``Encoder``), so
        the factor is ``2 ** (len(block_out_channels) - 1)`` (VQ-f4: 4, the KL-f8 of DiT and SD: 8).
        """
        cfg = self.autoencoder.config
        check(latent_shape[0] == cfg.latent_channels,
              f"the noise predictor samples {latent_shape[0]} channels but its autoencoder decodes {cfg.latent_channels}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        return int(cfg.out_channels), int(latent_shape[1]) * factor, int(latent_shape[2]) * factor

    @torch.no_grad()
    def forward(self, latents: Tensor) -> Tensor:
        """Images, float32 in [-1, 1], on the latents' device (the autoencoder must be there too)."""
        dtype = next(self.autoencoder.parameters()).dtype
        images = self.autoencoder.decode(latents.to(dtype) / self.scaling_factor, return_dict=False)[0]
        return images.float().clamp(-1, 1)
