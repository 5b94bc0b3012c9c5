"""Save and load like diffusers: gaq.from_pretrained, save_pretrained on a quantized model, real pipelines."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel

import gaq
from gaq.errors import GaqError
from gaq.quant import (QuantConfig, UncalibratedTimestepWarning, WeightRangeConfig, calibrate_activations,
                       iter_quant_layers, load_quantized, quantize, rounding_parameters, save_quantized)
from gaq.quant.export import FP_PARTS_FILE, _legacy_architecture_fingerprint, architecture_fingerprint

FAST = WeightRangeConfig(method="minmax")
STEPS = 4


def _uncond_unet(seed=0, width=32):
    """An unconditional UNet2DModel with attention, as DDIMPipeline drives it (no class labels)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(width, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()


def _scheduler():
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    s.set_timesteps(STEPS)
    return s


def _calibrated(fp, preset="tfmq_compat"):
    """W4A8 with per-step scales at the DDIM sampler's timesteps, rounding moved off nearest, activations on."""
    ts = _scheduler().timesteps.clone()
    torch.manual_seed(1)
    q = quantize(fp, QuantConfig(w_bits=4, a_bits=8, preset=preset, w_range=FAST), timesteps=ts)
    with torch.no_grad():
        for alpha in rounding_parameters(q):
            alpha.add_(torch.randn_like(alpha) * 2)
    g = torch.Generator().manual_seed(7)
    batches = [{"x": torch.randn(STEPS, 1, 16, 16, generator=g), "t": ts, "step": torch.arange(STEPS), "cond": {}}
               for _ in range(2)]
    calibrate_activations(q, batches)
    return q


def _sample(unet):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images


def test_from_pretrained_round_trip_drops_into_ddim_pipeline(tmp_path):
    torch.manual_seed(0)
    fp = _uncond_unet()
    q = _calibrated(fp)
    ref, fp_images = _sample(q), _sample(fp)
    assert np.abs(ref - fp_images).max() > 1e-3  # the quantized model is not the FP one

    q.save_pretrained(tmp_path / "q")  # diffusers' call writes gaq's format
    loaded = gaq.from_pretrained(tmp_path / "q")
    assert isinstance(loaded, UNet2DModel) and not loaded.training
    assert np.array_equal(_sample(loaded), ref)
    for (n, a), (m, b) in zip(iter_quant_layers(q), iter_quant_layers(loaded)):
        assert n == m and torch.equal(a.integer_codes(), b.integer_codes())
    # the same folder written by save_quantized, with metadata, loads the same
    save_quantized(q, tmp_path / "q2", base_source="tests/uncond", config=QuantConfig(), extra_meta={"k": 1})
    assert np.array_equal(_sample(gaq.quant.from_pretrained(tmp_path / "q2")), ref)
    # and the loaded model saves again, to the same tensors
    loaded.save_pretrained(tmp_path / "q3")
    assert np.array_equal(_sample(gaq.from_pretrained(tmp_path / "q3")), ref)


def test_pipeline_save_pretrained_writes_the_quantized_model_never_the_fp_one(tmp_path):
    fp = _uncond_unet()
    q = _calibrated(fp)
    ref = _sample(q)
    pipe = DDIMPipeline(unet=q, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    pipe.save_pretrained(tmp_path / "pipe")
    unet_dir = tmp_path / "pipe" / "unet"
    assert (unet_dir / "quant_config.json").is_file() and (unet_dir / FP_PARTS_FILE).is_file()
    assert not list(unet_dir.glob("diffusion_pytorch_model*")) and not (unet_dir / "config.json").exists()
    # diffusers' own loaders cannot read it, so they can never silently give back the FP model
    for folder in (unet_dir, save_quantized(q, tmp_path / "direct")):
        with pytest.raises(OSError):
            UNet2DModel.from_pretrained(folder)
    with pytest.raises(OSError):
        DDIMPipeline.from_pretrained(tmp_path / "pipe")
    # a pipeline loads with the quantized unet handed in
    back = DDIMPipeline.from_pretrained(tmp_path / "pipe", unet=gaq.from_pretrained(unet_dir))
    back.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = back(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert np.array_equal(images, ref)
    with pytest.raises(GaqError, match="push_to_hub"):
        q.save_pretrained(tmp_path / "hub", push_to_hub=True)
    fp.save_pretrained(tmp_path / "fp")  # the FP model keeps diffusers' own save_pretrained
    assert (tmp_path / "fp" / "config.json").is_file()


def test_from_pretrained_refuses_incomplete_or_damaged_folders(tmp_path):
    q = _calibrated(_uncond_unet())
    folder = save_quantized(q, tmp_path / "q")
    with pytest.raises(GaqError, match="not a gaq quantized-model folder"):
        gaq.from_pretrained(tmp_path / "nothing")
    parts = (folder / FP_PARTS_FILE).read_bytes()
    (folder / FP_PARTS_FILE).write_bytes(parts[: len(parts) // 2])
    with pytest.raises(GaqError, match="truncated or corrupt"):
        gaq.from_pretrained(folder)
    (folder / FP_PARTS_FILE).unlink()  # an export of an older gaq: quantized parts only
    with pytest.raises(GaqError, match="load_quantized"):
        gaq.from_pretrained(folder)
    save_quantized(q, folder)
    meta = json.loads((folder / "quant_config.json").read_text())
    meta["model_config"]["block_out_channels"] = [16, 64]
    (folder / "quant_config.json").write_text(json.dumps(meta))
    with pytest.raises(GaqError, match="builds architecture"):
        gaq.from_pretrained(folder)


def test_architecture_fingerprint_ignores_where_the_model_was_loaded_from(tmp_path, monkeypatch):
    fp = _uncond_unet()
    fp.save_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    relative = UNet2DModel.from_pretrained("m")
    absolute = UNet2DModel.from_pretrained(str(tmp_path / "m"))
    copied = UNet2DModel.from_pretrained("copy")
    prints = {architecture_fingerprint(m) for m in (fp, relative, absolute, copied)}
    assert len(prints) == 1
    assert architecture_fingerprint(_uncond_unet(width=16)) not in prints
    assert architecture_fingerprint(_uncond_unet(seed=1)) in prints  # weights are not architecture
    # a model quantized from one path loads onto the same model read from another
    q = quantize(relative, QuantConfig(w_bits=4, a_bits=32, preset="brecq_compat", w_range=FAST))
    folder = save_quantized(q, "q")
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(load_quantized(folder, copied)(x, t).sample, q(x, t).sample)
    # an export written before the fix (its fingerprint hashed the path) still loads onto the model from that path
    meta = json.loads((folder / "quant_config.json").read_text())
    meta["base_arch_fingerprint"] = _legacy_architecture_fingerprint(relative)
    (folder / "quant_config.json").write_text(json.dumps(meta))
    load_quantized(folder, UNet2DModel.from_pretrained("m"))
    with pytest.raises(GaqError, match="not the architecture"):
        load_quantized(folder, _uncond_unet(width=16))


def test_uncalibrated_timesteps_warn_once_each_naming_the_nearest_step():
    q = _calibrated(_uncond_unet())  # calibrated at 750, 500, 250, 0
    x = torch.randn(2, 1, 16, 16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        q(x, torch.tensor([750, 0]))
        assert not caught
        q(x, torch.tensor([400, 400]))
        q(x, torch.tensor([400, 740]))
        q(x, 400)
    messages = [str(w.message) for w in caught if issubclass(w.category, UncalibratedTimestepWarning)]
    assert len(messages) == 2 and len(caught) == 2
    assert "timestep 400 " in messages[0] and "nearest calibrated step, timestep 500 (step 1)" in messages[0]
    assert "timestep 740 " in messages[1] and "timestep 750 (step 0)" in messages[1]


def _tiny_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=8).eval()


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",)).eval()


def _dit_sample(transformer, vae):
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(class_labels=[1, 7], num_inference_steps=STEPS, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def test_from_pretrained_dit_drops_into_dit_pipeline(tmp_path):
    fp, vae = _tiny_dit(), _tiny_vae()
    ts = _scheduler().timesteps.clone()
    q = quantize(fp, QuantConfig(w_bits=4, a_bits=8, preset="qdiff_compat", w_range=FAST), timesteps=ts)
    g = torch.Generator().manual_seed(7)
    calibrate_activations(q, [{"x": torch.randn(STEPS, 4, 8, 8, generator=g), "t": ts, "step": torch.arange(STEPS),
                               "cond": {"class_labels": torch.arange(STEPS)}}])
    ref = _dit_sample(q, vae)
    assert np.abs(ref - _dit_sample(fp, vae)).max() > 1e-4
    q.save_pretrained(tmp_path / "q")
    loaded = gaq.from_pretrained(tmp_path / "q")
    assert isinstance(loaded, DiTTransformer2DModel)
    assert np.array_equal(_dit_sample(loaded, vae), ref)


def test_from_pretrained_cross_attention_unet_round_trip(tmp_path, tiny_cond_unet):
    ts = _scheduler().timesteps.clone()
    q = quantize(tiny_cond_unet, QuantConfig(w_bits=4, a_bits=8, preset="tfmq_compat", w_range=FAST), timesteps=ts)
    g = torch.Generator().manual_seed(7)
    text = torch.randn(STEPS, 3, 16, generator=g)
    calibrate_activations(q, [{"x": torch.randn(STEPS, 4, 8, 8, generator=g), "t": ts, "step": torch.arange(STEPS),
                               "cond": {"encoder_hidden_states": text}}])
    loaded = gaq.from_pretrained(save_quantized(q, tmp_path / "q"))
    x = torch.randn(STEPS, 4, 8, 8, generator=g)
    with torch.no_grad():
        out, back = q(x, ts, encoder_hidden_states=text).sample, loaded(x, ts, encoder_hidden_states=text).sample
        assert torch.equal(out, back)
        assert not torch.equal(out, tiny_cond_unet(x, ts, encoder_hidden_states=text).sample)


SD_STEPS = 2  # the Stable-Diffusion pipeline's inference steps


def _sd_pipeline(unet, tokenizer_dir):
    """A real StableDiffusionPipeline of tiny random parts (CLIP text encoder and tokenizer built offline, a
    KL autoencoder, DDIM) around ``unet``."""
    from diffusers import StableDiffusionPipeline
    from test_prompts import make_scheduler, make_text_encoder, make_tokenizer, make_vae

    tokenizer = make_tokenizer(tokenizer_dir)
    pipe = StableDiffusionPipeline(vae=make_vae(), text_encoder=make_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                                   unet=unet, scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_sample(unet, tokenizer_dir):
    with torch.no_grad():
        return _sd_pipeline(unet, tokenizer_dir)(
            prompt=["a cat", "a boat"], num_inference_steps=SD_STEPS, guidance_scale=2.0, output_type="np",
            generator=torch.Generator().manual_seed(0)).images


def test_from_pretrained_unet_drops_into_stable_diffusion_pipeline(tmp_path, tiny_cond_unet):
    """A UNet2DConditionModel quantized W4A8 with per-step scales at the pipeline's own timesteps, saved with its
    save_pretrained and loaded with gaq.from_pretrained, runs in a StableDiffusionPipeline (prompts through the
    CLIP text encoder, classifier-free guidance) and gives the saved model's images exactly."""
    from test_prompts import MAX_LEN, make_scheduler

    scheduler = make_scheduler()
    scheduler.set_timesteps(SD_STEPS)
    ts = scheduler.timesteps.clone()
    q = quantize(tiny_cond_unet, QuantConfig(w_bits=4, a_bits=8, preset="tfmq_compat", w_range=FAST), timesteps=ts)
    g = torch.Generator().manual_seed(7)
    text = torch.randn(SD_STEPS, MAX_LEN, 16, generator=g)  # (B, tokens, cross_attention_dim)
    calibrate_activations(q, [{"x": torch.randn(SD_STEPS, 4, 8, 8, generator=g), "t": ts, "step": torch.arange(SD_STEPS),
                               "cond": {"encoder_hidden_states": text}}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedTimestepWarning)  # the pipeline runs the calibrated timesteps
        ref = _sd_sample(q, tmp_path / "bpe")
        q.save_pretrained(tmp_path / "q")
        loaded = gaq.from_pretrained(tmp_path / "q")
        assert type(loaded) is type(tiny_cond_unet) and not loaded.training
        images = _sd_sample(loaded, tmp_path / "bpe")
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert np.array_equal(images, ref)
    assert np.abs(ref - _sd_sample(tiny_cond_unet, tmp_path / "bpe")).max() > 1e-4  # not the FP model's images
