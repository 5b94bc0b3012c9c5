"""DDIM sampling of any supported noise predictor, with classifier-free guidance and a per-step hook.

diffusers' ``DDIMScheduler`` derives the previous timestep from uniform spacing, so it cannot run
the quadratic schedule of the Q-Diffusion / TFMQ-DM CIFAR-10 protocol; the update below is DDIM's
(Song et al., Eq. 12) on the model's own ``alphas_cumprod`` for any timestep sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from gaq.errors import check
from gaq.models.runner import COMPILE_MODES, PRECISIONS, CompileMode, ModelRunner, Precision
from gaq.models.denoiser import concat_cond

Spacing = Literal["uniform", "quadratic", "linspace", "trailing"]

# on_step(step_index, t, model_input, model_cond): called with exactly what the model sees at that step.
StepHook = Callable[[int, Tensor, Tensor, Mapping[str, Tensor]], None]


@dataclass
class SamplerConfig:
    """How to sample: DDIM steps, eta, timestep spacing and guidance, and how fast to run the model.

    Attributes:
        steps: number of DDIM steps.
        eta: DDIM stochasticity (0 = deterministic).
        spacing: ``uniform`` (every T/steps-th timestep from 0, Q-Diffusion's "uniform"),
            ``quadratic`` (Q-Diffusion's "quad": squares of a linspace up to sqrt(0.8 T), truncated;
            at 100 steps its first few timesteps repeat 0, exactly as in the original DDIM code),
            ``linspace`` (rounded linspace over [0, T-1]), ``trailing`` (diffusers' trailing).
        guidance_scale: classifier-free guidance scale; 1 means no guidance (one model call a step).
        clip_sample: clip the predicted x0 to [-1, 1].
        steps_offset: added to every timestep of the spacing (diffusers' ``steps_offset``; CompVis'
            LDM DDIM sampler: 1, i.e. 1, 6, ..., 996 at 200 steps).
        set_alpha_to_one: the last step goes to ``alpha = 1`` (the original DDIM code, Q-Diffusion);
            False: to ``alphas_cumprod[0]`` (CompVis' LDM sampler; diffusers' ``set_alpha_to_one``).
        precision: the model call's arithmetic: ``fp32`` (as is, the default), ``tf32`` (CUDA matmuls
            and convolutions in TF32) or ``bf16`` (autocast); the DDIM update stays float64 either way.
        channels_last: run the model in channels-last memory format (its 4-D weights are converted in
            place while sampling, and made contiguous again after).
        cuda_graph: capture one model call per batch shape as a CUDA graph and replay it every step (CUDA only).
        compile: wrap the model call in ``torch.compile``.
        compile_mode: ``torch.compile``'s ``mode`` with ``compile`` (``default``,
            ``max-autotune-no-cudagraphs``: also benchmarks Triton templates for the convolutions and
            matmuls, minutes of compilation; CUDA graphs come from ``cuda_graph``, not from the mode).
        See :mod:`gaq.models.runner` for what each speed option does; all off, the model is called plainly.
        ``cuda_graph`` and ``compile`` pay off with a runner kept across batches (``gaq evaluate`` and
        :func:`gaq.eval.generation.generate` keep one per job); :func:`ddim_sample` given a plain module
        builds them for that call alone.
    """

    steps: int = 50
    eta: float = 0.0
    spacing: Spacing = "uniform"
    guidance_scale: float = 1.0
    clip_sample: bool = True
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    precision: Precision = "fp32"
    channels_last: bool = False
    cuda_graph: bool = False
    compile: bool = False
    compile_mode: CompileMode = "default"

    def __post_init__(self):
        check(self.precision in PRECISIONS,
              f"sampler.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check(self.compile_mode in COMPILE_MODES,
              f"sampler.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")

    def timesteps(self, num_train_timesteps: int) -> Tensor:
        """The descending timesteps this sampler calls the model at (spacing plus ``steps_offset``)."""
        return sampling_timesteps(num_train_timesteps, self.steps, self.spacing, self.steps_offset)

    def eager(self) -> "SamplerConfig":
        """The same sampler with every speed option off (fp32, eager, default memory format)."""
        return replace(self, precision="fp32", channels_last=False, cuda_graph=False, compile=False,
                       compile_mode="default")


def sampling_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing, offset: int = 0) -> Tensor:
    """The descending timestep sequence of a DDIM run (long tensor of length ``steps``), each shifted by ``offset``."""
    check(1 <= steps <= num_train_timesteps, f"sampler steps must be in [1, {num_train_timesteps}], got {steps}")
    check(offset >= 0, f"sampler steps_offset must be >= 0, got {offset}")
    T = num_train_timesteps
    if spacing == "uniform":
        seq = np.arange(0, T, T // steps)[:steps]
    elif spacing == "quadratic":
        seq = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
    elif spacing == "linspace":
        seq = np.linspace(0, T - 1, steps).round().astype(np.int64)
    elif spacing == "trailing":
        seq = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[::-1] - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    seq = seq + offset
    check(int(seq.max()) < T, f"sampler steps_offset {offset} puts timestep {int(seq.max())} past the schedule's "
          f"{T} steps: lower steps_offset")
    return torch.from_numpy(np.ascontiguousarray(seq[::-1])).long()


def _guided_input(x: Tensor, cond: Mapping[str, Tensor], null_cond: Mapping[str, Tensor] | None, guided: bool):
    if not guided:
        return x, dict(cond)
    return torch.cat([x, x]), concat_cond(cond, null_cond)


@torch.no_grad()
def ddim_sample(
    model: nn.Module | ModelRunner,
    alphas_cumprod: Tensor,
    noise: Tensor,
    cfg: SamplerConfig,
    cond: Mapping[str, Tensor] | None = None,
    null_cond: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
) -> Tensor:
    """Run DDIM from ``noise`` (x_T) and return x_0.

    Args:
        model: the noise predictor, or a :class:`~gaq.models.runner.ModelRunner` of it (reused across
            calls, so CUDA graphs and compiled code are built once); a plain module is run with
            ``cfg``'s speed options through a runner made for this call.
        alphas_cumprod: the training schedule's cumulative alphas, shape ``(T,)``.
        noise: starting noise, shape ``(B, C, H, W)``; its device and dtype are used throughout.
        cfg: steps, eta, spacing, guidance (a given runner's speed options win over ``cfg``'s).
        cond / null_cond: condition dictionaries (``null_cond`` is the unconditional one, needed when
            ``cfg.guidance_scale != 1``); the guided model input is ``cat([cond, null])``.
        generator: CPU generator for the eta noise, so results do not depend on the device.
        on_step: hook called before every model call with the model's exact input.

    With ``eta == 0`` and no ``on_step`` the loop never waits for the device: timesteps and schedule
    indices are host integers, and the update runs on the device in float64.
    """
    cond = dict(cond or {})
    guided = cfg.guidance_scale != 1.0
    check(not guided or null_cond is not None, "guidance_scale != 1 needs an unconditional (null) condition")
    runner = model if isinstance(model, ModelRunner) else ModelRunner.for_sampler(model, cfg)
    runner.begin()
    device = noise.device
    acp = alphas_cumprod.to(device=device, dtype=torch.float64)
    timesteps = cfg.timesteps(len(acp))
    a_end = torch.ones((), dtype=acp.dtype, device=device) if cfg.set_alpha_to_one else acp[0]
    x = noise
    try:
        for i, t in enumerate(timesteps.tolist()):
            t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
            x_in, c_in = _guided_input(x, cond, null_cond, guided)
            t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
            if on_step is not None:
                on_step(i, t_in, x_in, c_in)
            eps = runner(x_in, t_in, c_in)
            if guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
            a_t = acp[t]
            a_prev = acp[t_prev] if t_prev >= 0 else a_end
            x64, eps64 = x.double(), eps.double()
            x0 = (x64 - (1 - a_t).sqrt() * eps64) / a_t.sqrt()
            if cfg.clip_sample:
                x0 = x0.clamp(-1, 1)
                eps64 = (x64 - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            sigma = cfg.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            x_next = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps64
            if cfg.eta > 0:
                z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
                x_next = x_next + sigma * z.double()
            x = x_next.to(noise.dtype)
    finally:
        if runner is not model:
            runner.release()
    return x
