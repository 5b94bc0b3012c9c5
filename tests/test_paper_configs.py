"""Paper-protocol configs run end to end on a random-initialised model of the exact architecture
(built here, no download), with tiny sample counts: only the weights are missing offline."""
from __future__ import annotations

import json

import torch
from diffusers import DDPMScheduler, UNet2DModel
from test_calibrate_cli import gaq

from gaq.models.loading import Denoiser, save_denoiser

# google/ddpm-cifar10-32's unet/config.json (architecture keys)
CIFAR10_DDPM = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional", dropout=0.1,
)


def test_cifar10_paper_config_runs_end_to_end_on_the_exact_architecture(tmp_path):
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    model = UNet2DModel(**CIFAR10_DDPM).eval()
    assert 35e6 < sum(p.numel() for p in model.parameters()) < 36.5e6  # 35.7M, as the hub model
    save_denoiser(Denoiser(model, sched.alphas_cumprod, (3, 32, 32), "none"), tmp_path / "cifar", sched)
    run = tmp_path / "run"
    gaq("calibrate", "--config", "configs/paper/cifar10_ddpm_w4a8.yaml", "--data.source", str(tmp_path / "cifar"),
        "--data.cache_dir", str(tmp_path / "calib"), "--data.calib.steps", "10", "--data.calib.samples_per_step", "8",
        "--data.calib.batch_size", "8", "--data.split.num_groups", "2", "--model.recon.iters", "2",
        "--model.recon.batch_size", "4", "--gac.meta_iters", "1", "--gac.meta_batch", "4",
        "--diagnostics.enabled", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--run_dir", str(run), timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    # TFMQ-DM's 32 units: the time block, 22 ResBlocks, 6 attention blocks, 3 upsample convs
    kinds = [u["kind"] for u in summary["units"]]
    assert (kinds.count("time"), kinds.count("resnet"), kinds.count("attention"), kinds.count("sampler")) == (1, 22, 6, 3)
    assert summary["method"] == "gac" and (run / "quantized" / "quantized.safetensors").exists()
