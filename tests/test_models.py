"""Loading and saving noise predictors: local layouts, hub ids without network, condition inference."""
import json
import os
import socket

import huggingface_hub.constants
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise
from gaq.models.loading import Denoiser, load_denoiser, model_fingerprint, save_denoiser

NUM_CLASSES = 10


def _class_denoiser(model, scheduler) -> Denoiser:
    return Denoiser(model, scheduler.alphas_cumprod, (1, 16, 16), "class", NUM_CLASSES, NUM_CLASSES)


def _tiny_dit(num_classes: int = NUM_CLASSES) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=8,
    ).eval()


def _same_outputs(a, b, x, cond):
    t = torch.tensor([3, 500, 999][: len(x)])
    with torch.no_grad():
        return torch.equal(predict_noise(a, x, t, cond), predict_noise(b, x, t, cond))


def test_unet_pipeline_layout_round_trip(tiny_unet, ddpm_scheduler, tmp_path):
    den = _class_denoiser(tiny_unet, ddpm_scheduler)
    save_denoiser(den, tmp_path / "m", ddpm_scheduler)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model_index.json", "unet", "scheduler", "gaq.json"}
    assert json.loads((tmp_path / "m" / "gaq.json").read_text()) == {"num_classes": 10, "null_label": 10}
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.stat().st_mode & 0o777 for f in (tmp_path / "m").rglob("*") if f.is_file()}
    assert modes == {0o666 & ~umask}  # the user's umask, not diffusers' private 0600 safetensors

    back = load_denoiser(tmp_path / "m")
    assert (back.cond_kind, back.num_classes, back.null_label) == ("class", 10, 10)
    assert back.sample_shape == (1, 16, 16)
    assert torch.equal(back.alphas_cumprod, ddpm_scheduler.alphas_cumprod)
    assert back.fingerprint == den.fingerprint  # independent of the path it was loaded from
    assert not back.model.training
    x = torch.randn(3, 1, 16, 16)
    assert _same_outputs(tiny_unet, back.model, x, {"class_labels": torch.tensor([0, 7, 10])})
    # the layout is diffusers' own: its DDPM pipeline reads it too
    assert isinstance(DDPMPipeline.from_pretrained(tmp_path / "m"), DDPMPipeline)


def test_text_unet_round_trip(tiny_cond_unet, tmp_path):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = Denoiser(tiny_cond_unet, scheduler.alphas_cumprod, (4, 8, 8), "text")
    save_denoiser(den, tmp_path / "t", scheduler)
    back = load_denoiser(str(tmp_path / "t"))
    assert (back.cond_kind, back.num_classes, back.null_label, back.sample_shape) == ("text", None, None, (4, 8, 8))
    assert torch.allclose(back.alphas_cumprod, scheduler.alphas_cumprod)
    x = torch.randn(2, 4, 8, 8)
    assert _same_outputs(tiny_cond_unet, back.model, x, {"encoder_hidden_states": torch.randn(2, 5, 16)})


def test_bare_model_folder_with_scheduler_subfolder_or_beside(tiny_unet, ddpm_scheduler, tmp_path):
    tiny_unet.save_pretrained(tmp_path / "a")
    ddpm_scheduler.save_pretrained(tmp_path / "a" / "scheduler")
    tiny_unet.save_pretrained(tmp_path / "b")
    ddpm_scheduler.save_pretrained(tmp_path / "b")  # scheduler_config.json next to config.json
    for folder in ("a", "b"):
        den = load_denoiser(tmp_path / folder)
        # no gaq.json: every class embedding is a real class, no null label
        assert (den.cond_kind, den.num_classes, den.null_label) == ("class", NUM_CLASSES + 1, None)
        assert torch.equal(den.alphas_cumprod, ddpm_scheduler.alphas_cumprod)
        assert den.fingerprint == model_fingerprint(tiny_unet)


def test_unconditional_unet_and_torch_dtype(ddpm_scheduler, tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    save_denoiser(Denoiser(unet, ddpm_scheduler.alphas_cumprod, (3, 8, 8)), tmp_path / "u", ddpm_scheduler)
    den = load_denoiser(tmp_path / "u", torch_dtype=torch.float64)
    assert (den.cond_kind, den.num_classes, den.null_label, den.sample_shape) == ("none", None, None, (3, 8, 8))
    assert {p.dtype for p in den.model.parameters()} == {torch.float64}


def test_dit_null_label_from_its_label_embedding(ddpm_scheduler, tmp_path):
    dit = _tiny_dit()
    # like DiT-XL-2: num_embeds_ada_norm classes, one more embedding row = the null label
    dit.save_pretrained(tmp_path / "bare")
    ddpm_scheduler.save_pretrained(tmp_path / "bare" / "scheduler")
    den = load_denoiser(tmp_path / "bare")
    assert isinstance(den.model, DiTTransformer2DModel)
    assert (den.cond_kind, den.num_classes, den.null_label, den.sample_shape) == ("class", 10, 10, (4, 8, 8))
    x = torch.randn(2, 4, 8, 8)
    assert _same_outputs(dit, den.model, x, {"class_labels": torch.tensor([3, 10])})
    assert predict_noise(den.model, x, torch.tensor([1, 2]), {"class_labels": torch.tensor([3, 10])}).shape == x.shape

    save_denoiser(den, tmp_path / "pipe", ddpm_scheduler)
    assert (tmp_path / "pipe" / "transformer" / "config.json").is_file()
    assert load_denoiser(tmp_path / "pipe").null_label == 10


def test_legacy_transformer2d_config_name_loads_as_dit(ddpm_scheduler, tmp_path):
    """Hub DiT checkpoints name their class Transformer2DModel (the AdaLN-Zero variant)."""
    _tiny_dit().save_pretrained(tmp_path / "legacy")
    ddpm_scheduler.save_pretrained(tmp_path / "legacy" / "scheduler")
    config_path = tmp_path / "legacy" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "Transformer2DModel"
    config_path.write_text(json.dumps(config))
    den = load_denoiser(tmp_path / "legacy")
    assert (den.cond_kind, den.num_classes, den.null_label) == ("class", 10, 10)


def _one_line_error(call) -> str:
    with pytest.raises(GaqError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_local_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    assert str(missing) in _one_line_error(lambda: load_denoiser(missing))
    assert "./nowhere/model" in _one_line_error(lambda: load_denoiser("./nowhere/model"))


def test_folder_without_model_files(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "model_index.json" in _one_line_error(lambda: load_denoiser(tmp_path / "empty"))


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every host lookup or socket connection; HF_HUB_OFFLINE lifted inside huggingface_hub.

    huggingface_hub read HF_HUB_OFFLINE=1 (tests/conftest.py) at import; it is lifted here so that only
    gaq keeps the network off.
    """
    monkeypatch.delenv("GAQ_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(target, *args, **kwargs):
        attempts.append(target)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address, *a: refuse(address))
    return attempts


def test_hub_id_not_cached_fails_without_touching_the_network(no_network):
    repo = "gaq-tests-nonexistent-org/nonexistent-ddpm"
    message = _one_line_error(lambda: load_denoiser(repo))
    assert repo in message and "GAQ_ALLOW_DOWNLOADS=1" in message
    assert no_network == []


def test_hub_id_in_the_local_cache_loads_without_network(no_network, tiny_unet, ddpm_scheduler, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo_dir = cache / "models--gaq-tests--tiny-ddpm"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123abcd")
    save_denoiser(_class_denoiser(tiny_unet, ddpm_scheduler), repo_dir / "snapshots" / "0123abcd", ddpm_scheduler)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    den = load_denoiser("gaq-tests/tiny-ddpm")
    assert den.source == "gaq-tests/tiny-ddpm"
    assert (den.cond_kind, den.num_classes, den.null_label) == ("class", 10, 10)
    assert den.fingerprint == model_fingerprint(tiny_unet)
    assert no_network == []


def test_hub_id_with_downloads_on_but_hub_offline(monkeypatch):
    # tests/conftest.py sets HF_HUB_OFFLINE=1, so huggingface_hub refuses at once
    monkeypatch.setenv("GAQ_ALLOW_DOWNLOADS", "1")
    message = _one_line_error(lambda: load_denoiser("gaq-tests-nonexistent-org/nonexistent-ddpm"))
    assert "cannot load model" in message


def test_unsupported_model_class_and_scheduler(tiny_unet, ddpm_scheduler, tmp_path):
    save_denoiser(_class_denoiser(tiny_unet, ddpm_scheduler), tmp_path / "m", ddpm_scheduler)
    config_path = tmp_path / "m" / "unet" / "config.json"
    good = config_path.read_text()
    config_path.write_text(good.replace('"UNet2DModel"', '"UNet1DModel"'))
    index = tmp_path / "m" / "model_index.json"
    index.write_text(index.read_text().replace('"UNet2DModel"', '"UNet1DModel"'))
    assert "UNet1DModel" in _one_line_error(lambda: load_denoiser(tmp_path / "m"))

    index.write_text(index.read_text().replace('"UNet1DModel"', '"UNet2DModel"'))
    config_path.write_text(good)
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "m" / "scheduler")
    assert "alphas_cumprod" in _one_line_error(lambda: load_denoiser(tmp_path / "m"))


def test_save_rejects_a_scheduler_that_does_not_match(tiny_unet, ddpm_scheduler, tmp_path):
    other = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    den = _class_denoiser(tiny_unet, ddpm_scheduler)
    _one_line_error(lambda: save_denoiser(den, tmp_path / "m", other))


def test_gaq_json_that_does_not_fit_the_model(tiny_unet, ddpm_scheduler, tmp_path):
    save_denoiser(_class_denoiser(tiny_unet, ddpm_scheduler), tmp_path / "m", ddpm_scheduler)
    (tmp_path / "m" / "gaq.json").write_text(json.dumps({"num_classes": 10, "null_label": 11}))
    assert "gaq.json" in _one_line_error(lambda: load_denoiser(tmp_path / "m"))
