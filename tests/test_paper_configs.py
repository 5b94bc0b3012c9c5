"""Paper-protocol configs run end to end on a random-initialised model of the exact architecture
(built here, no download), with tiny sample counts: only the weights are missing offline.

The latent models (LSUN-Bedrooms and ImageNet LDM-4, DiT-XL/2) are too large for that on a CPU: their
full-size architectures are built on the meta device to count parameters and reconstruction units,
and the configs run end to end on the same architectures at scaled-down widths and resolutions."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel,
                       UNet2DModel, VQModel)
from test_calibrate_cli import gaq

from gaq.calib.units import find_units
from gaq.eval.callbacks import SampleGridCallback
from gaq.eval.generation import SamplingConfig
from gaq.models.sampling import SamplerConfig
from gaq.models.denoiser import predict_noise
from gaq.models.latent import LatentDecoder
from gaq.models.loading import Denoiser, load_denoiser, save_denoiser
from gaq.quant import QuantConfig
from gaq.quant.config import resolve_config
from gaq.quant.export import load_quantized
from gaq.quant.wrap import build_quantized, plan_quantization

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from paper_archs import (CIFAR10_DDPM, CIN256_UNET, DIT_SCHEDULE, DIT_XL2, KL_F8, LDM4_UNET,  # noqa: E402
                         LDM_SCHEDULE, VQ_F4)

# The architectures (CIFAR10_DDPM, LDM4_UNET, VQ_F4, LDM_SCHEDULE, CIN256_UNET, DIT_XL2, KL_F8, DIT_SCHEDULE) live in
# bench/paper_archs.py, shared with bench/speed_paper.py.


def test_cifar10_paper_config_runs_end_to_end_on_its_architecture(tmp_path):
    """The exact 35.7M architecture has TFMQ-DM's 32 units (counted on the meta device); the paper config runs
    end to end, unchanged but for the source, on the same architecture at base width 32 (the exact one took
    over 3 minutes of this test on a 2-core CPU)."""
    full = _on_meta(UNet2DModel, CIFAR10_DDPM)
    assert 35e6 < sum(p.numel() for p in full.parameters()) < 36.5e6  # 35.7M, as the hub model
    # TFMQ-DM's 32 units: the time block, 22 ResBlocks, 6 attention blocks, 3 upsample convs
    assert _unit_kinds_on_meta(full, (3, 32, 32), {}) == {"time": 1, "resnet": 22, "attention": 6, "sampler": 3}
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    model = UNet2DModel(**{**CIFAR10_DDPM, "block_out_channels": (32, 64, 64, 64)}).eval()
    save_denoiser(Denoiser(model, sched.alphas_cumprod, (3, 32, 32), "none"), tmp_path / "cifar", sched)
    run = tmp_path / "run"
    gaq("calibrate", "--config", "configs/paper/cifar10_ddpm_w4a8.yaml", "--data.source", str(tmp_path / "cifar"),
        "--data.cache_dir", str(tmp_path / "calib"), "--data.calib.steps", "10", "--data.calib.samples_per_step", "8",
        "--data.calib.batch_size", "8", "--data.split.num_groups", "2", "--model.recon.iters", "2",
        "--model.recon.batch_size", "4", "--gac.meta_iters", "1", "--gac.meta_batch", "4",
        "--diagnostics.enabled", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        *SOME_OF_EVERY_KIND, "--run_dir", str(run), timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    kinds = [u["kind"] for u in summary["units"]]
    assert (kinds.count("time"), kinds.count("resnet"), kinds.count("attention"), kinds.count("sampler")) == (1, 22, 6, 3)
    assert summary["method"] == "gac" and (run / "quantized" / "quantized.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Latent diffusion (LSUN-Bedrooms LDM-4, ImageNet LDM-4) and the transformer case (DiT-XL/2).
# Full-size architectures are built on the meta device (no memory, no weights) to count parameters
# and reconstruction units; the end-to-end runs use the same block types, depth, patching and
# conditioning at scaled-down widths and resolutions, with a tiny autoencoder of the same kind.
# --------------------------------------------------------------------------------------------

# The tiny runs: few samples, two kept steps, two reconstruction iterations per unit, and a unit of every kind
# reconstructed (time path, mid block's ResBlocks and attention, samplers, loose layers; the rest keep nearest
# rounding, and every unit is still counted in the summary).
SOME_OF_EVERY_KIND = ("--units", '["time_embedding", "mid_block.*", "kind:sampler", "kind:layer"]')
TINY_RUN = (*SOME_OF_EVERY_KIND, "--data.calib.samples_per_step", "4", "--data.calib.batch_size", "4", "--data.split.num_groups", "2",
            "--model.recon.iters", "2", "--model.recon.batch_size", "4", "--model.recon.cache_batch", "16",
            "--gac.meta_iters", "1", "--gac.meta_batch", "4", "--diagnostics.enabled", "false",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")


def _scaled(config: dict, **changes) -> dict:
    return {**config, **changes}


def _unit_kinds_on_meta(model: torch.nn.Module, x_shape: tuple, cond: dict) -> dict[str, int]:
    """Reconstruction units of ``model`` (built on the meta device) under tfmq_compat: a forward pass on meta tensors
    finds their order; quantizer ranges are not initialised (meta weights have no values)."""
    settings = resolve_config(QuantConfig(preset="tfmq_compat"))
    qmodel = build_quantized(model, settings, plan_quantization(model, settings), torch.arange(10), init_ranges=False)
    x = torch.zeros(1, *x_shape, device="meta")
    cond = {k: v.to("meta") for k, v in cond.items()}
    units = find_units(qmodel, lambda: predict_noise(qmodel, x, torch.zeros(1, dtype=torch.long, device="meta"), cond))
    return dict(Counter(u.kind for u in units))


def _on_meta(cls, config: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return cls(**config).eval()


def _calibrate(config: str, model_dir: Path, tmp_path: Path, *extra: str) -> dict:
    run = tmp_path / "run"
    gaq("calibrate", "--config", config, "--data.source", str(model_dir), "--data.cache_dir", str(tmp_path / "calib"),
        *TINY_RUN, *extra, "--run_dir", str(run), timeout=600)
    return json.loads((run / "summary.json").read_text())


def _decoded_grid(model_dir: Path, run: Path) -> tuple[tuple[int, int], str]:
    """Sample a 2x2 grid from the run's quantized model through the latent decoder; the PNG's (width, height) and mode."""
    from PIL import Image

    den = load_denoiser(model_dir)
    qmodel = load_quantized(run / "quantized", den.model)
    sampler = SamplerConfig(steps=2, guidance_scale=1.0, clip_sample=False)
    grid = SampleGridCallback(per_class=2, max_rows=2, scale=1, sampling=SamplingConfig(4, 4, 0, sampler))
    with Image.open(grid.on_calibration_end(qmodel, den, run)["grid"]) as png:
        return png.size, png.mode


def test_lsun_ldm4_full_size_architecture():
    unet = _on_meta(UNet2DModel, LDM4_UNET)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 274  # LDM-4 on LSUN-Bedrooms: 274M
    # TFMQ-DM-style units: the time block, 22 ResBlocks, 16 attention blocks, 3 upsample convs (downsample convs stay FP)
    assert _unit_kinds_on_meta(unet, (3, 64, 64), {}) == {"time": 1, "resnet": 22, "attention": 16, "sampler": 3}
    vq = LatentDecoder(_on_meta(VQModel, VQ_F4), 1.0)
    assert vq.image_shape((3, 64, 64)) == (3, 256, 256)


def test_lsun_ldm4_config_runs_end_to_end_and_decodes(tmp_path):
    torch.manual_seed(0)
    sched = DDIMScheduler(**LDM_SCHEDULE)
    unet = UNet2DModel(**_scaled(LDM4_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64), norm_num_groups=8)).eval()
    vq = VQModel(**_scaled(VQ_F4, num_vq_embeddings=64, block_out_channels=(8, 8, 8), norm_num_groups=4,
                           layers_per_block=1, sample_size=64)).eval()
    save_denoiser(Denoiser(unet, sched.alphas_cumprod, (3, 16, 16), decoder=LatentDecoder(vq, 1.0)), tmp_path / "ldm", sched)
    assert json.loads((tmp_path / "ldm" / "gaq.json").read_text())["latent_scaling_factor"] == 1.0
    summary = _calibrate("configs/paper/lsun_bedrooms_ldm4_w4a8.yaml", tmp_path / "ldm", tmp_path,
                         "--data.calib.steps", "20")  # interval 10: two kept steps
    assert dict(Counter(u["kind"] for u in summary["units"])) == {"time": 1, "resnet": 22, "attention": 16, "sampler": 3}
    # 3x16x16 latents decode to 3x64x64 images: a 2x2 grid with 1-pixel gaps
    assert _decoded_grid(tmp_path / "ldm", tmp_path / "run") == ((131, 131), "RGB")


def test_imagenet_ldm4_full_size_architecture():
    unet = _on_meta(UNet2DConditionModel, CIN256_UNET)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 401  # cin256-v2: 400.9M
    cond = {"encoder_hidden_states": torch.zeros(1, 1, 512)}  # the class embedding as a one-token context
    assert _unit_kinds_on_meta(unet, (3, 64, 64), cond) == {"time": 1, "resnet": 22, "attention": 16, "sampler": 3}


def test_imagenet_ldm4_config_runs_end_to_end_with_class_embeddings(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sched = DDIMScheduler(**LDM_SCHEDULE)
    unet = UNet2DConditionModel(**_scaled(CIN256_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64),
                                          norm_num_groups=8, cross_attention_dim=16)).eval()
    vq = VQModel(**_scaled(VQ_F4, num_vq_embeddings=64, block_out_channels=(8, 8, 8), norm_num_groups=4,
                           layers_per_block=1, sample_size=64)).eval()
    save_denoiser(Denoiser(unet, sched.alphas_cumprod, (3, 16, 16), "text", decoder=LatentDecoder(vq, 1.0)),
                  tmp_path / "cin", sched)
    table = torch.randn(11, 16)  # the ClassEmbedder's table: 10 classes + the null class
    save_file({"cond": table[:10, None].contiguous(), "uncond": table[10:]}, str(tmp_path / "classes.safetensors"))
    summary = _calibrate("configs/paper/imagenet_ldm4_w4a8.yaml", tmp_path / "cin", tmp_path, "--data.calib.steps", "2",
                         "--data.calib.cond_embeddings", str(tmp_path / "classes.safetensors"),
                         "--data.calib.classes", "[0, 3, 9]")  # the config's 32 classes need 1,000 rows
    assert dict(Counter(u["kind"] for u in summary["units"])) == {"time": 1, "resnet": 22, "attention": 16, "sampler": 3}


def test_dit_xl2_full_size_architecture():
    dit = _on_meta(DiTTransformer2DModel, DIT_XL2)
    # 675M in the original; diffusers keeps a timestep / label embedder copy in each of the 28 blocks
    assert round(sum(p.numel() for p in dit.parameters()) / 1e6) == 750
    cond = {"class_labels": torch.zeros(1, dtype=torch.long)}
    # the 28 AdaLN-Zero transformer blocks and the final adaLN linear (proj_out_1); no UNet time path
    assert _unit_kinds_on_meta(dit, (4, 32, 32), cond) == {"attention": 28, "layer": 1}
    settings = resolve_config(QuantConfig(preset="tfmq_compat"))
    kept = plan_quantization(dit, settings).kept_fp
    assert len(kept) == 30 and {"pos_embed.proj", "proj_out_2"} <= set(kept)  # + 28 first timestep linears
    assert LatentDecoder(_on_meta(AutoencoderKL, KL_F8), 0.18215).image_shape((4, 32, 32)) == (3, 256, 256)


def test_dit_xl2_config_runs_end_to_end_and_decodes(tmp_path):
    torch.manual_seed(0)
    sched = DDIMScheduler(**DIT_SCHEDULE)
    dit = DiTTransformer2DModel(**_scaled(DIT_XL2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                          sample_size=8)).eval()
    vae = AutoencoderKL(**_scaled(KL_F8, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1,
                                  sample_size=64)).eval()
    den = Denoiser(dit, sched.alphas_cumprod, (4, 8, 8), "class", 1000, 1000, decoder=LatentDecoder(vae, 0.18215))
    save_denoiser(den, tmp_path / "dit", sched)
    loaded = load_denoiser(tmp_path / "dit")
    assert (loaded.cond_kind, loaded.num_classes, loaded.null_label, loaded.image_shape) == ("class", 1000, 1000, (3, 64, 64))
    summary = _calibrate("configs/paper/imagenet_dit_xl2_w4a8.yaml", tmp_path / "dit", tmp_path, "--data.calib.steps", "4")
    assert dict(Counter(u["kind"] for u in summary["units"])) == {"attention": 2, "layer": 1}
    assert summary["method"] == "gac"
    assert _decoded_grid(tmp_path / "dit", tmp_path / "run") == ((131, 131), "RGB")  # 4x8x8 latents -> 3x64x64 images


def test_cifar10_evaluation_protocol_config_runs(tmp_path):
    """configs/paper/cifar10_ddpm_evaluate.yaml (50,000 samples, DDIM 100 quadratic, Inception FID)
    parses and runs end to end with tiny overrides: a small unconditional UNet and an .npz reference."""
    import numpy as np
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 16),
                        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    sched = DDPMScheduler(num_train_timesteps=1000)
    save_denoiser(Denoiser(model, sched.alphas_cumprod, (3, 8, 8), "none", source="tiny"), tmp_path / "m", sched)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "eval"
    gaq("evaluate", "--config", "configs/paper/cifar10_ddpm_evaluate.yaml", "--source", str(tmp_path / "m"),
        "--num_samples", "6", "--batch_size", "6", "--sampler.steps", "4", "--reference.path", str(tmp_path / "ref.npz"),
        "--reference.cache_dir", str(tmp_path / "cache"), "--metrics.inception", "off",
        "--timestep_error.num_samples", "2", "--timestep_error.batch_size", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--out_dir", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"]["count"] == 6
    assert metrics["sampling"]["sampler"]["spacing"] == "quadratic" and metrics["sampling"]["sampler"]["eta"] == 0.0
    assert (out / "samples_grid.png").exists()
    # no classifier: the protocol's metrics are Inception's, skipped here (no weights offline) with a note
    assert metrics["metrics"] == {} and any("FID-Inception and IS skipped" in n for n in metrics["notes"])
