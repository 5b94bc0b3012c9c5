"""The exact architectures of the paper configs (``configs/paper/*.yaml``), for random-weight models built
without a download: ``tests/test_paper_configs.py`` checks them (parameter and unit counts) and
``bench/speed_paper.py`` times them.

``PAPER_MODELS`` maps a config's ``name:`` to its noise predictor, schedule, conditioning and latent
autoencoder; :func:`build_paper_denoiser` builds one (full size, or ``quick``: the same block types and
depth at scaled-down widths and resolutions, as the tests' end-to-end runs use).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel,
                       VQModel)

sys.path.insert(0, str(Path(__file__).parent))
from speed_cifar import CIFAR_UNET  # noqa: E402

from gaq.models.latent import LatentDecoder  # noqa: E402
from gaq.models.loading import Denoiser  # noqa: E402

# google/ddpm-cifar10-32's unet/config.json (architecture keys): the one bench/speed_cifar.py times
CIFAR10_DDPM = dict(CIFAR_UNET)
CIFAR10_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear")

# CompVis' LDM-4 UNet of lsun_bedrooms-ldm-vq-4.yaml (= celebahq-ldm-vq-4.yaml: model_channels 224, channel_mult
# 1,2,3,4, attention at downsampling factors 2,4,8, num_head_channels 32, 3x64x64 latents) in diffusers' UNet2DModel
# terms, as CompVis/ldm-celebahq-256's unet/ holds it (diffusers' UNet2DModel defaults are this model's):
# cos-first timestep embedding, stride-2 padding-1 downsampling, GroupNorm eps 1e-5.
LDM4_UNET = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(224, 448, 672, 896),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_num_groups=32,
    norm_eps=1e-5, act_fn="silu",
)
# The VQ-f4 first stage (embed_dim 3, n_embed 8192, ch 128, ch_mult 1,2,4): CompVis/ldm-celebahq-256's vqvae/config.json
VQ_F4 = dict(
    in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=8192, block_out_channels=(128, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2,
    norm_num_groups=32, sample_size=256,
)
# LDM's "linear" betas (linear_start 0.0015, linear_end 0.0195) are diffusers' scaled_linear
LDM_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                    clip_sample=False)
# CompVis' cin256-v2.yaml (model_channels 192, channel_mult 1,2,3,5, num_heads 1, attention at factors 2,4,8,
# SpatialTransformer depth 1 with context_dim 512, 3x64x64 latents) in diffusers' UNet2DConditionModel terms
# (attention_head_dim is the head count there: one head per block).
CIN256_UNET = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(192, 384, 576, 960),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=1, cross_attention_dim=512, transformer_layers_per_block=1, use_linear_projection=False,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
)
# facebook/DiT-XL-2-256 transformer/config.json (its defaults in diffusers' DiTTransformer2DModel are DiT-XL/2's;
# 8 output channels: learned sigma)
DIT_XL2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
    patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_eps=1e-5, norm_elementwise_affine=False,
    activation_fn="gelu-approximate", attention_bias=True,
)
# its vae/ (stabilityai/sd-vae-ft-ema, the KL-f8 autoencoder, scaling_factor 0.18215)
KL_F8 = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
)
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)

# The scaled-down variants of the tests' end-to-end runs (tests/test_paper_configs.py) and of
# bench/sampling_throughput.py --quick: same block types and depth, a fraction of the width.
_TINY_VQ = dict(num_vq_embeddings=64, block_out_channels=(8, 8, 8), norm_num_groups=4, layers_per_block=1,
                sample_size=64)
_TINY_KL = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1, sample_size=64)


@dataclass(frozen=True)
class PaperModel:
    """The model of one paper config: noise predictor, schedule, conditioning, latent autoencoder."""

    description: str
    cls: type
    arch: dict
    schedule: dict
    cond_kind: str = "none"              # none | class | text (class embedding as a one-token context)
    num_classes: int | None = None
    null_label: int | None = None
    autoencoder: type | None = None      # VQModel / AutoencoderKL, or None (pixel space)
    autoencoder_arch: dict = field(default_factory=dict)
    latent_scale: float = 1.0
    quick: dict = field(default_factory=dict)               # changes to ``arch`` for --quick
    quick_autoencoder: dict = field(default_factory=dict)   # changes to ``autoencoder_arch`` for --quick


PAPER_MODELS: dict[str, PaperModel] = {
    "cifar10-ddpm": PaperModel(
        "google/ddpm-cifar10-32 (DDPM UNet, 32x32 pixels)", UNet2DModel, CIFAR10_DDPM, CIFAR10_SCHEDULE,
        quick=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1)),
    "lsun-bedrooms-ldm4": PaperModel(
        "LDM-4 LSUN-Bedrooms (UNet on 3x64x64 VQ-f4 latents)", UNet2DModel, LDM4_UNET, LDM_SCHEDULE,
        autoencoder=VQModel, autoencoder_arch=VQ_F4, latent_scale=1.0,
        quick=dict(sample_size=16, block_out_channels=(32, 32, 64, 64), norm_num_groups=8),
        quick_autoencoder=_TINY_VQ),
    "imagenet-ldm4": PaperModel(
        "LDM-4 ImageNet cin256-v2 (cross-attention UNet on 3x64x64 VQ-f4 latents)", UNet2DConditionModel,
        CIN256_UNET, LDM_SCHEDULE, cond_kind="text", autoencoder=VQModel, autoencoder_arch=VQ_F4, latent_scale=1.0,
        quick=dict(sample_size=16, block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=16),
        quick_autoencoder=_TINY_VQ),
    "imagenet-dit-xl2": PaperModel(
        "DiT-XL/2 ImageNet 256 (transformer on 4x32x32 KL-f8 latents)", DiTTransformer2DModel, DIT_XL2, DIT_SCHEDULE,
        cond_kind="class", num_classes=1000, null_label=1000, autoencoder=AutoencoderKL, autoencoder_arch=KL_F8,
        latent_scale=0.18215, quick=dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
        quick_autoencoder=_TINY_KL),
}


def paper_model(name: str) -> PaperModel:
    if name not in PAPER_MODELS:
        raise KeyError(f"no architecture for config name {name!r}; known: {', '.join(PAPER_MODELS)}")
    return PAPER_MODELS[name]


def write_class_embeddings(path: Path, dim: int, classes: int = 1000, seed: int = 0) -> Path:
    """A random ClassEmbedder table as the ImageNet LDM config's ``cond_embeddings`` file: ``cond``
    ``(classes, 1, dim)`` (class i's one-token context) and ``uncond`` ``(1, dim)`` (the null class)."""
    from safetensors.torch import save_file

    table = torch.randn(classes + 1, dim, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"cond": table[:classes, None].contiguous(), "uncond": table[classes:].contiguous()}, str(path))
    return path


def build_paper_denoiser(name: str, device: torch.device | str = "cpu", quick: bool = False, seed: int = 0,
                         decoder: bool = True) -> tuple[Denoiser, dict[str, Any]]:
    """A random-weight :class:`Denoiser` of the paper config ``name`` (its ``name:`` key), built on ``device``.

    Returns the denoiser (with the latent decoder for latent models when ``decoder``) and a description:
    the architecture used and its parameter counts. The fingerprint is a fixed string (hashing hundreds of
    millions of random weights would only cost time).
    """
    spec = paper_model(name)
    device = torch.device(device)
    arch = {**spec.arch, **(spec.quick if quick else {})}
    torch.manual_seed(seed)
    with device:  # initialise on the device: a 750M-parameter DiT is quick to build on a GPU
        model = spec.cls(**arch).eval()
    model.to(device).requires_grad_(False)
    acp = DDIMScheduler(**spec.schedule).alphas_cumprod
    shape = (int(arch["in_channels"]), int(arch["sample_size"]), int(arch["sample_size"]))
    dec, ae_params = None, 0
    if decoder and spec.autoencoder is not None:
        ae_arch = {**spec.autoencoder_arch, **(spec.quick_autoencoder if quick else {})}
        with device:
            ae = spec.autoencoder(**ae_arch).eval()
        ae.to(device).requires_grad_(False)
        ae_params = sum(p.numel() for p in ae.parameters())
        dec = LatentDecoder(ae, spec.latent_scale)
    den = Denoiser(model, acp, shape, spec.cond_kind, spec.num_classes, spec.null_label,
                   source=f"{name} architecture{' (quick)' if quick else ''}, random weights",
                   fingerprint=f"bench-{name}{'-quick' if quick else ''}-s{seed}", decoder=dec)
    info = {"description": spec.description + (" at reduced width (quick)" if quick else ""),
            "class": spec.cls.__name__, "params": sum(p.numel() for p in model.parameters()),
            "autoencoder": spec.autoencoder.__name__ if spec.autoencoder is not None else None,
            "autoencoder_params": ae_params, "sample_shape": list(shape),
            "image_shape": list(den.image_shape), "quick": quick}
    return den, info
