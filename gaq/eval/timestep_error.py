"""Per-step noise-prediction error of a quantized model against its FP model.

Both models see exactly the same inputs: the FP model's DDIM trajectories. At every sampling step
the hook of :func:`gaq.models.sampling.ddim_sample` hands over the FP model's input ``(x_t, t,
cond)`` (under classifier-free guidance the doubled batch ``[cond, null]``), and both models
predict the noise on it. The result is, per sampling step, the mean squared difference
``mean((eps_Q - eps_FP)^2)`` over samples and pixels, and the same relative to the FP prediction's
power ``mean(eps_FP^2)``. Errors of the quantized model therefore never feed back into the inputs:
the curve isolates the per-step prediction error from its accumulation along the trajectory.

The same per timestep group: the sampling steps split into G contiguous groups in sampling order
(:func:`gaq.calib.grouping.contiguous_groups`, GAC's timestep groups), ``group_mse`` the mean of the
per-step MSE over each group's steps.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from gaq.calib.grouping import contiguous_groups
from gaq.errors import check
from gaq.eval.generation import Conditioning, module_device, sample_noise
from gaq.models.sampling import SamplerConfig, ddim_sample
from gaq.models.denoiser import predict_noise
from gaq.models.loading import Denoiser

JSON_FILE = "timestep_error.json"
PNG_FILE = "timestep_error.png"


@dataclass
class TimestepErrorConfig:
    """The per-step error measurement (only for a quantized run).

    Attributes:
        enabled: measure it.
        num_samples: trajectories (conditions round-robin, as for the samples).
        batch_size: trajectories per DDIM run.
        num_groups: G, contiguous timestep groups of ``group_mse`` (at most the sampler's steps:
            with fewer steps, one group per step).
    """

    enabled: bool = True
    num_samples: int = 64
    batch_size: int = 64
    num_groups: int = 5

    def __post_init__(self):
        check(self.num_groups >= 1, f"timestep_error.num_groups must be >= 1, got {self.num_groups}")


@torch.no_grad()
def timestep_error(fp_model: nn.Module, q_model: nn.Module, den: Denoiser, sampler: SamplerConfig,
                   conditioning: "Conditioning", cfg: TimestepErrorConfig, seed: int) -> dict:
    """MSE between the quantized and the FP noise prediction at every DDIM step of FP trajectories.

    Args:
        fp_model: the FP noise predictor (drives the trajectories).
        q_model: the quantized model, on the same device.
        den: schedule, sample shape and conditioning metadata.
        sampler: DDIM settings (the evaluation's; its speed options are ignored).
        conditioning: how trajectory ``i`` is conditioned (round-robin condition ids).
        cfg: trajectories and batch size.
        seed: noise seed (trajectory ``i`` starts from the same noise as evaluation sample ``i``).

    Returns:
        ``{"steps": [{"step", "t", "mse", "rel_mse"}], "mean_mse", "mean_rel_mse", "max_mse",
        "num_groups", "group_mse", "group_steps", "num_samples", "sampler"}``; ``step`` 0 is the first
        model call (pure noise); ``group_mse[g]`` is the mean MSE of group ``g``'s steps
        ``group_steps[g] = [first, last]``.
    """
    check(cfg.num_samples >= 1 and cfg.batch_size >= 1, "timestep_error.num_samples and batch_size must be >= 1")
    sampler = sampler.eager()  # the error of the models, not of the runtime: both run plainly in fp32
    device = module_device(fp_model)
    dtype = next(iter(fp_model.parameters())).dtype
    timesteps = sampler.timesteps(len(den.alphas_cumprod))
    n_steps = len(timesteps)
    sq_err = torch.zeros(n_steps, dtype=torch.float64)
    fp_power = torch.zeros(n_steps, dtype=torch.float64)
    count = torch.zeros(n_steps, dtype=torch.float64)
    ids = conditioning.cond_ids(cfg.num_samples)
    guided = sampler.guidance_scale != 1.0

    def on_step(i: int, t_in: Tensor, x_in: Tensor, c_in: Mapping[str, Tensor]) -> None:
        eps_fp = predict_noise(fp_model, x_in, t_in, c_in).double()
        eps_q = predict_noise(q_model, x_in, t_in, c_in).double()
        sq_err[i] += float(((eps_q - eps_fp) ** 2).sum())
        fp_power[i] += float((eps_fp ** 2).sum())
        count[i] += eps_fp.numel()

    for s in range(0, cfg.num_samples, cfg.batch_size):
        idx = torch.arange(s, min(s + cfg.batch_size, cfg.num_samples))
        noise = sample_noise(seed, idx, tuple(den.sample_shape)).to(device, dtype)
        cond, null = conditioning.build(ids[idx], device, dtype)
        ddim_sample(fp_model, den.alphas_cumprod, noise, sampler, cond, null if guided else None,
                    generator=torch.Generator().manual_seed(seed), on_step=on_step)
    mse = sq_err / count.clamp(min=1)
    rel = sq_err / fp_power.clamp(min=1e-30)
    steps = [{"step": i, "t": int(timesteps[i]), "mse": float(mse[i]), "rel_mse": float(rel[i])} for i in range(n_steps)]
    groups = contiguous_groups(n_steps, min(cfg.num_groups, n_steps))
    members = [(groups == g).nonzero().flatten() for g in range(int(groups.max()) + 1)]
    return {"steps": steps, "mean_mse": float(mse.mean()), "mean_rel_mse": float(rel.mean()), "max_mse": float(mse.max()),
            "num_groups": len(members), "group_mse": [float(mse[m].mean()) for m in members],
            "group_steps": [[int(m[0]), int(m[-1])] for m in members],
            "num_samples": cfg.num_samples, "sampler": asdict(sampler)}


def save_timestep_error(result: Mapping, out_dir: str | Path, title: str = "quantized vs FP") -> tuple[Path, Path]:
    """Write ``timestep_error.json`` and a log-scale plot ``timestep_error.png``; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / JSON_FILE, out / PNG_FILE
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    steps = [s["step"] for s in result["steps"]]
    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, label in ((ax, "mse", "MSE of the noise prediction"), (ax_rel, "rel_mse", "MSE / mean(eps_FP^2)")):
        axis.plot(steps, [max(s[key], 1e-12) for s in result["steps"]], marker=".", lw=1)
        axis.set_yscale("log")
        axis.set_xlabel("DDIM step (0 = pure noise)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        for first, _ in result.get("group_steps", [])[1:]:  # timestep-group boundaries
            axis.axvline(first - 0.5, color="grey", ls="--", lw=0.8)
        ticks = steps[:: max(1, len(steps) // 6)]
        axis.set_xticks(ticks, [f"{i}\nt={result['steps'][i]['t']}" for i in ticks], fontsize=7)
    fig.suptitle(f"{title}: {result['num_samples']} FP trajectories")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
