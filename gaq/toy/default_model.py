"""DDPM training of the shipped models: the digits default and the CIFAR-shaped testbed.

The digits default is a small class-conditional diffusers ``UNet2DModel`` (about 1.2M parameters with
the defaults: three resolutions 16/8/4, attention at 8x8 and 4x4 and in the middle block, so attention
quantization is exercised), with ``num_class_embeds = num_classes + 1``: the last label is the null
class of classifier-free guidance. The testbed (``configs/testbed/train.yaml``) is an unconditional
``UNet2DModel`` with google/ddpm-cifar10-32's architecture (``num_classes: null``). :class:`DigitsDDPM`
trains either as a DDPM (epsilon prediction on a ``DDPMScheduler`` schedule), with label dropout when
class-conditional; :class:`EMAWeights` keeps an exponential moving average of the weights, which
replaces the raw weights when training ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from gaq.errors import check
from gaq.models.denoiser import predict_noise
from gaq.toy.digits import NUM_DIGIT_CLASSES
from gaq.models.loading import Denoiser

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


@dataclass
class DigitsUNetConfig:
    """Architecture of the default noise predictor (a diffusers ``UNet2DModel``).

    Attributes:
        sample_size: image side; must equal the data's ``image_size``.
        in_channels: image channels (1: grey digits).
        block_out_channels: channels per resolution (16, 8, 4 for three entries at sample_size 16).
        layers_per_block: ResNet blocks per down block (up blocks get one more, as in diffusers).
        down_block_types / up_block_types: diffusers block names; ``Attn*`` blocks carry self-attention.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        dropout: ResNet-block dropout.
        num_classes: real classes; the model gets ``num_classes + 1`` class embeddings (last = null).
            None: an unconditional model (no class embedding; batches' labels are ignored).
        attention_head_dim: channels per attention head; None: one head over all channels
            (google/ddpm-cifar10-32).
        flip_sin_to_cos / freq_shift: the sinusoidal timestep embedding (diffusers' defaults: True / 0;
            google/ddpm-cifar10-32: False / 1).
        downsample_padding: padding of the stride-2 downsampling convs (diffusers' default 1; DDPM's 0).
        norm_eps: GroupNorm epsilon (diffusers' default 1e-5; DDPM's 1e-6).
    """

    sample_size: int = 16
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int | None = 8
    norm_num_groups: int = 8
    dropout: float = 0.0
    num_classes: int | None = NUM_DIGIT_CLASSES
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    norm_eps: float = 1e-5


def build_digits_unet(cfg: DigitsUNetConfig) -> UNet2DModel:
    """A freshly initialised ``UNet2DModel``: class-conditional with ``num_class_embeds = num_classes + 1``,
    or unconditional when ``num_classes`` is None."""
    check(
        len(cfg.block_out_channels) == len(cfg.down_block_types) == len(cfg.up_block_types),
        "model.unet: block_out_channels, down_block_types and up_block_types must have the same length",
    )
    check(
        all(c % cfg.norm_num_groups == 0 for c in cfg.block_out_channels),
        f"model.unet.norm_num_groups ({cfg.norm_num_groups}) must divide every block_out_channels entry",
    )
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=None if cfg.num_classes is None else cfg.num_classes + 1,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
        downsample_padding=cfg.downsample_padding,
        norm_eps=cfg.norm_eps,
    )


@dataclass
class NoiseSchedule:
    """The DDPM training noise schedule (a diffusers ``DDPMScheduler``).

    Attributes:
        num_train_timesteps: T.
        beta_schedule: diffusers' beta schedule name.
        beta_start / beta_end: first and last beta (linear schedules).
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def scheduler(self) -> DDPMScheduler:
        """The diffusers scheduler (epsilon prediction, x0 clipped to [-1, 1])."""
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type="epsilon",
            clip_sample=True,
        )


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``lr * min_lr_ratio`` at the last step.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: Adam betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final learning rate as a share of ``lr``.

    Gradient clipping is the Trainer's (``trainer.gradient_clip_val``).
    """

    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DigitsDDPM(pl.LightningModule):
    """DDPM training of a shipped UNet (epsilon prediction; label dropout for class models).

    Batches are ``(x0 (B, C, S, S) in [-1, 1], labels (B,))``. Each step draws ``t ~ U{0..T-1}`` and
    ``eps ~ N(0, I)``, forms ``x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps``, replaces each label by the
    null label with probability ``label_dropout`` and minimises ``||eps_theta(x_t, t, y) - eps||^2``.
    An unconditional model (``unet.num_classes: null``) ignores the labels.

    Args:
        unet: architecture.
        schedule: noise schedule.
        label_dropout: probability of training a sample unconditionally (classifier-free guidance).
        optim: optimizer and learning-rate schedule.
    """

    def __init__(
        self,
        unet: DigitsUNetConfig = DigitsUNetConfig(),
        schedule: NoiseSchedule = NoiseSchedule(),
        label_dropout: float = 0.1,
        optim: OptimConfig = OptimConfig(),
    ):
        super().__init__()
        check(0.0 <= label_dropout < 1.0, f"model.label_dropout must be in [0, 1), got {label_dropout}")
        self.save_hyperparameters()
        self.unet_config = unet
        self.schedule = schedule
        self.label_dropout = label_dropout
        self.optim = optim
        self.unet = build_digits_unet(unet)
        # (T,) cumulative alphas of the training schedule
        self.register_buffer("alphas_cumprod", schedule.scheduler().alphas_cumprod.float(), persistent=False)
        self.epoch_losses: list[float] = []  # mean training loss of every finished epoch

    @property
    def null_label(self) -> int | None:
        """The class id that means "no class" (classifier-free guidance); None for an unconditional model."""
        return self.unet_config.num_classes

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        b = x0.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (b,), device=x0.device)
        eps = torch.randn_like(x0)
        acp = self.alphas_cumprod[t].view(b, 1, 1, 1)
        x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * eps
        cond = {}
        if self.null_label is not None:
            drop = torch.rand(b, device=x0.device) < self.label_dropout
            cond = {"class_labels": torch.where(drop, torch.full_like(labels, self.null_label), labels)}
        loss = F.mse_loss(predict_noise(self.unet, x_t, t, cond).float(), eps)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("train/loss_epoch")
        if loss is not None:
            self.epoch_losses.append(float(loss))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.unet.parameters(), lr=self.optim.lr, betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.optim.warmup_steps, total, self.optim.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def denoiser(self) -> Denoiser:
        """The trained UNet as a :class:`Denoiser` (on the module's current device)."""
        cfg = self.unet_config
        return Denoiser(
            model=self.unet.eval(),
            alphas_cumprod=self.alphas_cumprod.detach().cpu().clone(),
            sample_shape=(cfg.in_channels, cfg.sample_size, cfg.sample_size),
            cond_kind="none" if cfg.num_classes is None else "class",
            num_classes=cfg.num_classes,
            null_label=self.null_label,
            source="gaq train-default",
        )


class EMAWeights(Callback):
    """Exponential moving average of the trainable weights, copied into the model when training ends.

    After each optimizer step ``ema <- lerp(ema, w, 1 - d)`` with a decay that warms up as
    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not dominated by the
    random initial weights. One foreach update, no host-device synchronisation: Lightning's
    ``WeightAveraging`` (torch ``AveragedModel``) reads its update counter off the GPU twice a step,
    which stalls a small model's launch-bound training loop.

    Args:
        decay: final EMA decay per optimizer step.
        warmup: use the warm-up above (else the decay is constant).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        check(0.0 <= decay < 1.0, f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self._ema: list[Tensor] = []
        self._last_step = -1

    def _params(self, pl_module: pl.LightningModule) -> list[Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad and p.is_floating_point()]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        if self._ema:  # restored from a checkpoint
            self._ema = [e.to(p.device, p.dtype) for e, p in zip(self._ema, params)]
        else:
            self._ema = [p.detach().clone() for p in params]
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step this batch (gradient accumulation)
            return
        self._last_step = trainer.global_step
        self.updates += 1
        n = self.updates
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        torch._foreach_lerp_(self._ema, [p.detach() for p in self._params(pl_module)], 1.0 - decay)

    @torch.no_grad()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p, e in zip(self._params(pl_module), self._ema):
            p.copy_(e)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "ema": [e.detach().cpu() for e in self._ema]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.updates = int(state_dict["updates"])
        self._ema = [e.clone() for e in state_dict["ema"]]
