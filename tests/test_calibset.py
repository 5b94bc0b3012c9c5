"""Calibration-set generation, bookkeeping, files and the cache, on tiny real diffusers models."""
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import NUM_CLASSES, make_tiny_cond_unet, make_tiny_unet
from gaq.data.calibset import CalibrationSet, CalibSetConfig, cache_path, generate_calibration_set, load_or_generate
from gaq.errors import GaqError
from gaq.models.sampling import SamplerConfig, ddim_sample, sampling_timesteps
from gaq.models.loading import Denoiser


@pytest.fixture(scope="module")
def class_den():
    from diffusers import DDPMScheduler

    return Denoiser(make_tiny_unet(), DDPMScheduler().alphas_cumprod, (1, 16, 16), "class",
                    num_classes=NUM_CLASSES, null_label=NUM_CLASSES, source="tiny-unet")


@pytest.fixture(scope="module")
def text_den():
    from diffusers import DDPMScheduler

    return Denoiser(make_tiny_cond_unet(), DDPMScheduler().alphas_cumprod, (4, 8, 8), "text", source="tiny-cond")


def small_cfg(**kw) -> CalibSetConfig:
    base = dict(steps=10, interval=3, samples_per_step=6, batch_size=4, guidance_scale=2.0, seed=0)
    base.update(kw)
    return CalibSetConfig(**base)


def test_guided_cond_uncond_bookkeeping(class_den):
    cfg = small_cfg()
    cs = generate_calibration_set(class_den, cfg, progress=False)
    S, n, halves = 4, 6, 2  # kept steps 0, 3, 6, 9
    assert cs.kept_steps.tolist() == [0, 3, 6, 9]
    assert len(cs) == S * halves * n and cs.x.shape == (S * halves * n, 1, 16, 16)
    seq = sampling_timesteps(1000, 10, "quadratic")
    assert cs.timesteps.tolist() == seq[[0, 3, 6, 9]].tolist()
    # each kept step's tuples are contiguous, in sampling order, and carry that step's timestep
    assert cs.step.tolist() == [s for s in [0, 3, 6, 9] for _ in range(halves * n)]
    assert torch.equal(cs.t, seq[cs.step])
    assert torch.equal(cs.kept_pos, torch.arange(S).repeat_interleave(halves * n))
    labels = cs.cond["class_labels"].view(S, halves, n)
    assert bool((labels[:, 0] < NUM_CLASSES).all()) and bool((labels[:, 1] == NUM_CLASSES).all())
    assert bool((labels[:, 0] == labels[0, 0]).all())  # one label per trajectory, at every step
    x = cs.x.view(S, halves, n, 1, 16, 16)
    assert torch.equal(x[:, 0], x[:, 1])  # both CFG halves see the same x_t

    # the stored tuples are exactly what the sampler feeds the model (sampled here in one batch)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((n, 1, 16, 16), generator=gen)
    seen = {}
    ddim_sample(class_den.model, class_den.alphas_cumprod, noise,
                SamplerConfig(steps=10, spacing="quadratic", guidance_scale=2.0),
                cond={"class_labels": labels[0, 0]}, null_cond={"class_labels": labels[0, 1]},
                on_step=lambda i, t, xi, ci: seen.__setitem__(i, (t.clone(), xi.clone())))
    for pos, s in enumerate([0, 3, 6, 9]):
        t_in, x_in = seen[s]
        assert bool((t_in == cs.timesteps[pos]).all())
        torch.testing.assert_close(cs.x[cs.step == s], x_in, atol=1e-4, rtol=1e-4)

    meta = cs.meta
    assert meta["config"]["interval"] == 3 and meta["fingerprint"] == class_den.fingerprint
    assert meta["source"] == "tiny-unet" and meta["halves"] == 2
    assert {"gaq_version", "created", "cond_embeddings_sha256"} <= meta.keys()


def test_cond_only_and_unguided_keep_one_half(class_den):
    cs = generate_calibration_set(class_den, small_cfg(cond_pairing="cond_only"), progress=False)
    assert len(cs) == 4 * 6 and bool((cs.cond["class_labels"] < NUM_CLASSES).all())
    cs1 = generate_calibration_set(class_den, small_cfg(guidance_scale=1.0), progress=False)
    assert len(cs1) == 4 * 6 and bool((cs1.cond["class_labels"] < NUM_CLASSES).all())


def test_seed_determinism_and_batch_independence(class_den):
    a = generate_calibration_set(class_den, small_cfg(cond_pairing="cond_only"), progress=False)
    b = generate_calibration_set(class_den, small_cfg(cond_pairing="cond_only"), progress=False)
    c = generate_calibration_set(class_den, small_cfg(cond_pairing="cond_only", seed=1), progress=False)
    d = generate_calibration_set(class_den, small_cfg(cond_pairing="cond_only", batch_size=6), progress=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.cond["class_labels"], b.cond["class_labels"])
    assert not torch.allclose(a.x, c.x)
    torch.testing.assert_close(a.x, d.x, atol=1e-4, rtol=1e-4)


def test_steps_identified_by_index_not_timestep(class_den):
    # quadratic spacing at 100 steps: steps 96..99 all have timestep 0
    cs = generate_calibration_set(class_den, CalibSetConfig(steps=100, interval=3, samples_per_step=1,
                                                            batch_size=1), progress=False)
    assert cs.kept_steps.tolist() == list(range(0, 100, 3))
    assert cs.timesteps[-2:].tolist() == [0, 0]  # steps 96 and 99
    assert len(torch.unique(cs.timesteps)) < len(cs.kept_steps)
    assert torch.equal(cs.kept_pos, torch.arange(34))


def test_text_model_embeddings(text_den, tmp_path):
    with pytest.raises(GaqError, match="cond_embeddings"):
        generate_calibration_set(text_den, small_cfg(), progress=False)
    emb = torch.randn(3, 5, 16)
    uncond = torch.zeros(5, 16)
    path = tmp_path / "emb.safetensors"
    save_file({"cond": emb, "uncond": uncond}, str(path))
    cs = generate_calibration_set(text_den, small_cfg(cond_embeddings=str(path)), progress=False)
    ehs = cs.cond["encoder_hidden_states"].view(4, 2, 6, 5, 16)
    assert cs.x.shape == (48, 4, 8, 8)
    assert bool((ehs[:, 1] == 0).all())
    for row in ehs[0, 0]:  # every conditional row is one of the prompts
        assert any(torch.equal(row, e) for e in emb)
    save_file({"cond": emb}, str(tmp_path / "no_uncond.safetensors"))
    with pytest.raises(GaqError, match="uncond"):
        generate_calibration_set(text_den, small_cfg(cond_embeddings=str(tmp_path / "no_uncond.safetensors")),
                                 progress=False)


def test_save_load_roundtrip_and_errors(class_den, tmp_path):
    cfg = small_cfg(samples_per_step=2)
    cs = generate_calibration_set(class_den, cfg, progress=False)
    path = cs.save(tmp_path / "set.safetensors")
    back = CalibrationSet.load(path, expect_meta={"config": cs.meta["config"], "fingerprint": class_den.fingerprint})
    for name in ("x", "t", "step", "kept_steps", "timesteps"):
        assert torch.equal(getattr(back, name), getattr(cs, name))
    assert torch.equal(back.cond["class_labels"], cs.cond["class_labels"])
    assert back.meta["created"] == cs.meta["created"]
    sub = back.subset(torch.tensor([3, 0]))
    assert len(sub) == 2 and torch.equal(sub.x[1], cs.x[0])

    with pytest.raises(GaqError, match=r"config\.steps.*regenerate"):
        CalibrationSet.load(path, expect_meta={"config": {"steps": 20}})
    with pytest.raises(GaqError, match="fingerprint"):
        CalibrationSet.load(path, expect_meta={"fingerprint": "0123456789abcdef"})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GaqError, match="unreadable or truncated"):
        CalibrationSet.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GaqError, match="unreadable"):
        CalibrationSet.load(tmp_path / "junk.safetensors")
    with pytest.raises(GaqError, match="does not exist"):
        CalibrationSet.load(tmp_path / "missing.safetensors")


def test_cache_reuse_and_invalidation(class_den, tmp_path):
    cfg = small_cfg(samples_per_step=2, cond_pairing="cond_only")
    cs, path, reused = load_or_generate(class_den, cfg, tmp_path, progress=False)
    assert not reused and path.is_file() and path == cache_path(class_den, cfg, tmp_path)
    mtime = os.stat(path).st_mtime_ns
    cs2, path2, reused2 = load_or_generate(class_den, small_cfg(samples_per_step=2, cond_pairing="cond_only"),
                                           tmp_path, progress=False)
    assert reused2 and path2 == path and os.stat(path).st_mtime_ns == mtime
    assert torch.equal(cs2.x, cs.x)
    cs3, path3, reused3 = load_or_generate(class_den, small_cfg(samples_per_step=2, cond_pairing="cond_only", seed=5),
                                           tmp_path, progress=False)
    assert not reused3 and path3 != path and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path3.name])  # no temp files left
    # a damaged file under the set's name is made again (rerunning the command is the fix the error gives)
    path.write_bytes(b"not a safetensors file")
    cs4, path4, reused4 = load_or_generate(class_den, small_cfg(samples_per_step=2, cond_pairing="cond_only"),
                                           tmp_path, progress=False)
    assert not reused4 and path4 == path and torch.equal(cs4.x, cs.x)
    assert load_or_generate(class_den, small_cfg(samples_per_step=2, cond_pairing="cond_only"), tmp_path,
                            progress=False)[2]


def test_non_finite_trajectories_are_refused_and_not_cached(class_den, tmp_path):
    import copy

    broken = copy.deepcopy(class_den)
    with torch.no_grad():
        broken.model.conv_out.bias.fill_(float("inf"))
    broken.fingerprint = "broken"
    with pytest.raises(GaqError, match=r"turned non-finite \(NaN or Inf\) in \d+ of \d+ calibration tuples"):
        load_or_generate(broken, small_cfg(samples_per_step=2), tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [dict(interval=11), dict(interval=0), dict(samples_per_step=0), dict(steps=0),
                                 dict(batch_size=0), dict(eta=-1.0), dict(dtype="int8")])
def test_bad_config(bad):
    with pytest.raises(GaqError):
        small_cfg(**bad)


def test_bad_model_combinations(class_den):
    uncond = Denoiser(class_den.model, class_den.alphas_cumprod, (1, 16, 16), "none", fingerprint="x")
    with pytest.raises(GaqError, match="guidance_scale"):
        generate_calibration_set(uncond, small_cfg(), progress=False)
    no_null = Denoiser(class_den.model, class_den.alphas_cumprod, (1, 16, 16), "class", num_classes=10,
                       null_label=None, fingerprint="x")
    with pytest.raises(GaqError, match="null class"):
        generate_calibration_set(no_null, small_cfg(), progress=False)


@pytest.mark.parametrize("offset, alpha_to_one", [(0, True), (1, False)])
def test_ddim_matches_diffusers_ddim_scheduler(offset, alpha_to_one):
    """gaq's DDIM loop equals diffusers' DDIMScheduler, including CompVis' LDM conventions
    (timesteps shifted by one, the last step going to alphas_cumprod[0] instead of 1)."""
    from diffusers import DDIMScheduler

    model = make_tiny_unet().eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                          beta_end=0.0195, clip_sample=False, set_alpha_to_one=alpha_to_one, steps_offset=offset,
                          timestep_spacing="leading")
    sched.set_timesteps(10)
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    cfg = SamplerConfig(steps=10, spacing="uniform", clip_sample=False, steps_offset=offset,
                        set_alpha_to_one=alpha_to_one)
    assert cfg.timesteps(1000).tolist() == sched.timesteps.tolist()
    ours = ddim_sample(model, sched.alphas_cumprod, noise, cfg, cond={"class_labels": labels})
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, t.expand(3), class_labels=labels).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_steps_offset_past_the_schedule_is_refused():
    with pytest.raises(GaqError, match="steps_offset"):
        SamplerConfig(steps=10, spacing="linspace", steps_offset=1).timesteps(1000)


def test_calibration_timesteps_follow_the_offset(class_den):
    cs = generate_calibration_set(class_den, small_cfg(spacing="uniform", steps_offset=1, set_alpha_to_one=False),
                                  progress=False)
    assert cs.timesteps.tolist() == [901, 601, 301, 1]  # kept steps 0, 3, 6, 9 of 1, 101, ..., 901 descending
    assert set(cs.t.tolist()) == {901, 601, 301, 1}


def test_fixed_classes_are_cycled_over_the_trajectories(class_den):
    cs = generate_calibration_set(class_den, small_cfg(classes=[3, 7], guidance_scale=1.0), progress=False)
    labels = cs.cond["class_labels"].reshape(len(cs.kept_steps), -1)
    assert labels[0].tolist() == [3, 7, 3, 7, 3, 7] and (labels == labels[0]).all()
    with pytest.raises(GaqError, match="calib.classes holds class 99"):
        generate_calibration_set(class_den, small_cfg(classes=[99]), progress=False)
