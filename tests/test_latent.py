"""Latent diffusion models: the autoencoder is loaded with the noise predictor and decodes samples into images."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

from gaq.errors import GaqError
from gaq.eval.generation import Conditioning, SamplingConfig, sample_images
from gaq.models.sampling import SamplerConfig
from gaq.models.latent import LatentDecoder
from gaq.models.loading import Denoiser, load_denoiser, save_denoiser


def _tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=32, block_out_channels=(8, 8, 8),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=1, norm_num_groups=4, sample_size=32).eval()


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture
def ldm_folder(tmp_path):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    den = Denoiser(_tiny_unet(), sched.alphas_cumprod, (3, 8, 8), decoder=LatentDecoder(_tiny_vq(), 1.0))
    return save_denoiser(den, tmp_path / "ldm", sched)


def test_decoder_divides_by_the_scale_and_clamps():
    vq = _tiny_vq()
    z = 3 * torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = vq.decode(z / 0.5).sample.clamp(-1, 1)
    assert torch.allclose(LatentDecoder(vq, 0.5)(z), want, atol=1e-5)
    assert LatentDecoder(vq, 0.5).image_shape((3, 8, 8)) == (3, 32, 32)  # three blocks: factor 4


def test_pipeline_folder_round_trip_keeps_the_autoencoder_and_its_scale(ldm_folder):
    index = json.loads((ldm_folder / "model_index.json").read_text())
    assert index["vqvae"] == ["diffusers", "VQModel"] and (ldm_folder / "vqvae" / "config.json").is_file()
    den = load_denoiser(ldm_folder)
    # gaq.json's latent_scaling_factor wins over the VQModel config's default 0.18215
    assert den.decoder is not None and den.decoder.scaling_factor == 1.0
    assert (den.sample_shape, den.image_shape) == ((3, 8, 8), (3, 32, 32))
    meta = json.loads((ldm_folder / "gaq.json").read_text())
    del meta["latent_scaling_factor"]
    (ldm_folder / "gaq.json").write_text(json.dumps(meta))
    assert load_denoiser(ldm_folder).decoder.scaling_factor == pytest.approx(0.18215)


def test_sampled_latents_come_back_as_images(ldm_folder):
    den = load_denoiser(ldm_folder)
    sampling = SamplingConfig(num_samples=2, batch_size=2, sampler=SamplerConfig(steps=3, clip_sample=False))
    images = sample_images(den.model, den, torch.arange(2), torch.zeros(2, dtype=torch.long), sampling,
                           Conditioning.of(den, sampling))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and images.abs().max() <= 1


def test_pixel_models_have_no_decoder(tmp_path):
    sched = DDIMScheduler()
    save_denoiser(Denoiser(_tiny_unet(), sched.alphas_cumprod, (3, 8, 8)), tmp_path / "px", sched)
    den = load_denoiser(tmp_path / "px")
    assert den.decoder is None and den.image_shape == den.sample_shape == (3, 8, 8)
    assert "latent_scaling_factor" not in json.loads((tmp_path / "px" / "gaq.json").read_text())


def test_decoder_errors_areone_line():
    with pytest.raises(GaqError, match="must be one of VQModel, AutoencoderKL"):
        LatentDecoder(_tiny_unet(), 1.0)
    with pytest.raises(GaqError, match="must be > 0"):
        LatentDecoder(_tiny_vq(), 0.0)
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)
    with pytest.raises(GaqError, match="samples 3 channels but its autoencoder decodes 4"):
        LatentDecoder(kl, 0.18215).image_shape((3, 8, 8))


def test_latents_without_an_autoencoder_from_a_bare_folder_are_evaluated(tmp_path, capsys):
    """A 4-channel UNet2DConditionModel saved as bare unet/ + scheduler/ (no model_index.json, no vae/):
    `gaq evaluate` loads it and writes metrics and a grid of the latents' first 3 channels."""
    import yaml
    from conftest import make_tiny_cond_unet, one_line
    from PIL import Image
    from safetensors.torch import save_file

    from gaq.cli import main as gaq_main

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    make_tiny_cond_unet().save_pretrained(tmp_path / "bare" / "unet")
    assert "scheduler/scheduler_config.json" in one_line(lambda: load_denoiser(tmp_path / "bare"))
    sched.save_pretrained(tmp_path / "bare" / "scheduler")
    den = load_denoiser(tmp_path / "bare")
    assert (den.cond_kind, den.sample_shape, den.decoder) == ("text", (4, 8, 8), None)

    save_file({"cond": torch.randn(2, 5, 16), "uncond": torch.zeros(5, 16)}, str(tmp_path / "emb.safetensors"))
    cfg = {"source": str(tmp_path / "bare"), "num_samples": 4, "batch_size": 2, "sampler": {"steps": 2},
           "cond_embeddings": str(tmp_path / "emb.safetensors"), "reference": {"cache_dir": str(tmp_path / "cache")},
           "grid": {"per_class": 2, "scale": 1}, "timestep_error": {"enabled": False},
           "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(cfg))
    gaq_main(["evaluate", "--config", str(tmp_path / "ev.yaml"), "--out_dir", str(tmp_path / "out")])
    capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert any("4-channel latents" in note for note in metrics["notes"])
    assert Image.open(tmp_path / "out" / "samples_grid.png").mode == "RGB"



def test_bare_pipeline_folder_keeps_its_autoencoder(ldm_folder):
    (ldm_folder / "model_index.json").unlink()
    den = load_denoiser(ldm_folder)
    assert isinstance(den.decoder.autoencoder, VQModel) and den.decoder.scaling_factor == 1.0
