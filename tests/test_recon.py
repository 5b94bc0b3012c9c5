"""The block-reconstruction engine on a tiny class-conditional UNet: units, caches, reconstruction,
uniform/GAC weighting, NaN handling, run-folder checks (in-process; the CLI runs are in test_calibrate_cli.py)."""
from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from gaq.calib.cache import build_unit_cache
from gaq.calib.checkpoints import UnitCheckpoint
from gaq.calib.driver import CalibrationJob, calibration_batches, run_calibration
from gaq.calib.gac import GACConfig
from gaq.calib.gac_driver import DiagnosticsConfig, GACHooks
from gaq.calib.recon import ReconConfig, per_sample_error
from gaq.calib.units import find_units, fp_counterpart
from gaq.data.calibset import CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import CalibrationDataModule, SplitConfig
from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise
from gaq.models.loading import Denoiser
from gaq.quant import QuantConfig, iter_quant_layers, load_quantized, quantize, set_quant_state

CALIB = CalibSetConfig(steps=10, interval=2, samples_per_step=16, spacing="uniform", batch_size=16, seed=0)


@pytest.fixture(scope="module")
def setup():
    den = Denoiser(make_tiny_unet(), DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, (1, 16, 16),
                   "class", 10, 10, source="tiny")
    calib = generate_calibration_set(den, CALIB, "cpu", progress=False)
    return den, calib


def _dm(den, calib):
    dm = CalibrationDataModule("tiny", CALIB, SplitConfig(val_fraction=0.1, num_groups=5))
    dm.attach(denoiser=den, calib_set=calib).setup("fit")
    return dm


def _trainer(unit_dir: Path, _name: str) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                      limit_val_batches=0, enable_checkpointing=False, callbacks=[UnitCheckpoint(unit_dir)])


# the GAC tests reconstruct a ResBlock and an attention unit only (the others keep nearest rounding):
# the meta step's three levels of autograd dominate the suite's time on the CPU
GAC_UNITS = ["down_blocks.0.resnets.0", "down_blocks.1.attentions.0"]


def _job(den, calib, tmp_path, method="uniform", iters=12, quant=None, hooks=None, units=None, **recon):
    dm = _dm(den, calib)
    cfg = ReconConfig(iters=iters, batch_size=8, ckpt_every=5, cache_batch=32, **recon)
    if method == "gac" and hooks is None:
        hooks = GACHooks(GACConfig(meta_iters=3, meta_batch=8), dm, tmp_path)
    return CalibrationJob(den, dm, quant or QuantConfig(w_bits=4, a_bits=8), method, cfg, tmp_path, _trainer,
                          torch.device("cpu"), {"test": method}, hooks, units=units)


def _probe(qmodel, calib):
    b = next(calibration_batches(calib, 2))
    return lambda: predict_noise(qmodel, b["x"], b["t"], b["cond"])


def test_units_cover_every_quantized_layer_once_in_forward_order(setup):
    den, calib = setup
    qmodel = quantize(den.model, QuantConfig(w_bits=4, a_bits=8, preset="qdiff_compat"), timesteps=calib.timesteps)
    set_quant_state(qmodel, weight=False, act=False)
    units = find_units(qmodel, _probe(qmodel, calib))
    owned = [id(layer) for u in units for _, layer in u.layers]
    assert len(owned) == len(set(owned))
    assert sorted(owned) == sorted(id(m) for _, m in iter_quant_layers(qmodel))
    assert units[0].kind == "time" and {u.kind for u in units} >= {"time", "resnet", "attention", "sampler", "layer"}
    # forward order: each unit's module is first called after the previous unit's
    order: list[str] = []
    hooks = [u.module.register_forward_pre_hook(lambda m, a, _n=u.name: order.append(_n))
             for u in units[1:]]
    _probe(qmodel, calib)()
    for h in hooks:
        h.remove()
    first = list(dict.fromkeys(order))
    assert first == [u.name for u in units[1:]]


def test_cached_inputs_equal_partly_quantized_activations(setup):
    den, calib = setup
    qmodel = quantize(den.model, QuantConfig(w_bits=4, a_bits=32), timesteps=calib.timesteps)
    set_quant_state(qmodel, weight=False, act=False)
    units = find_units(qmodel, _probe(qmodel, calib))
    k = 3
    for unit in units[:k]:  # earlier units quantized (nearest rounding), later ones FP
        for _, layer in unit.layers:
            layer.set_quant_state(weight=True, act=False)
    unit = units[k]
    cache = build_unit_cache(qmodel, unit, den.model, fp_counterpart(unit, den.model),
                             calibration_batches(calib, 32), torch.device("cpu"))
    seen = []
    h = unit.module.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].clone()), with_kwargs=True)
    idx = torch.arange(5, 12)
    with torch.no_grad():
        predict_noise(qmodel, calib.x[idx], calib.t[idx], {k: v[idx] for k, v in calib.cond.items()})
    h.remove()
    args, _, target, _ = cache.batch(idx)
    torch.testing.assert_close(args[0], seen[0], rtol=0, atol=1e-6)
    # and the targets are the FP unit's outputs on the FP model's inputs: non-zero error vs quantized input
    assert target.shape[0] == len(idx)
    # recon.cache_dtype bfloat16: half the bytes, handed out in the captured dtype, values rounded to bf16
    half = build_unit_cache(qmodel, unit, den.model, fp_counterpart(unit, den.model),
                            calibration_batches(calib, 32), torch.device("cpu"), store_dtype=torch.bfloat16)
    assert half.nbytes * 2 == cache.nbytes
    args_h, _, target_h, step_h = half.batch(idx)
    assert args_h[0].dtype == args[0].dtype == torch.float32 and target_h.dtype == torch.float32
    torch.testing.assert_close(args_h[0], args[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(target_h, target, rtol=1e-2, atol=1e-2)
    assert torch.equal(step_h, cache.batch(idx)[3])


def test_reconstruction_beats_nearest_rounding_and_saves_a_loadable_model(setup, tmp_path):
    den, calib = setup
    summary = run_calibration(_job(den, calib, tmp_path, iters=40, warmup=0.2))
    units = summary["units"]
    assert summary["num_units"] == len(units) > 5
    assert all(u["cache_bytes"] > 0 and u["cache_on"] == "device" and u["peak_memory_bytes"] is None for u in units)
    better = [u["error_after"] < u["error_before"] for u in units]
    assert sum(better) >= 0.8 * len(units), units
    total_before = sum(u["error_before"] for u in units)
    total_after = sum(u["error_after"] for u in units)
    assert total_after < total_before
    assert (tmp_path / "summary.json").exists() and (tmp_path / "quantized").is_dir()
    q = load_quantized(tmp_path / "quantized", den.model)
    x = calib.x[:4]
    out = predict_noise(q, x, calib.t[:4], {k: v[:4] for k, v in calib.cond.items()})
    assert torch.isfinite(out).all()


def test_zero_meta_iterations_is_bit_identical_to_uniform(setup, tmp_path):
    den, calib = setup
    a = run_calibration(_job(den, calib, tmp_path / "u", iters=8, units=GAC_UNITS))
    dm = _dm(den, calib)
    hooks = GACHooks(GACConfig(meta_iters=0), dm, tmp_path / "g")
    b = run_calibration(_job(den, calib, tmp_path / "g", method="gac", iters=8, hooks=hooks, units=GAC_UNITS))
    assert [u["error_after"] for u in a["units"]] == [u["error_after"] for u in b["units"]]
    from safetensors.torch import load_file
    ta, tb = load_file(str(tmp_path / "u" / "quantized" / "quantized.safetensors")), \
        load_file(str(tmp_path / "g" / "quantized" / "quantized.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_gac_learns_weights_and_writes_diagnostics(setup, tmp_path):
    den, calib = setup
    dm = _dm(den, calib)
    hooks = GACHooks(GACConfig(meta_iters=4, meta_batch=8, meta_lr=0.5), dm, tmp_path,
                     DiagnosticsConfig(samples_per_step=4, alignment_samples=12, bins=3))
    summary = run_calibration(_job(den, calib, tmp_path, method="gac", iters=6, hooks=hooks, units=GAC_UNITS))
    stats = summary["gac"]["units"]
    assert stats and "time_embedding" not in stats  # the time unit stays uniform by default
    one = next(iter(stats.values()))
    assert one["max_min_ratio"] > 1.0 and 0.0 < one["normalized_entropy"] < 1.0
    assert math.isfinite(one["mean_conflict_before"]) and len(one["mean_weight_per_step"]) == 5
    # the learned weights' own effect on the per-step gradients, at the same rounding as "after"
    assert math.isfinite(one["mean_conflict_after_weighted"])
    assert one["mean_conflict_after_weighted"] != one["mean_conflict_after"]
    pngs = list((tmp_path / "diagnostics").glob("*.png"))
    assert len(pngs) == 3 * len(stats)
    assert len(list((tmp_path / "gac").glob("*-s.safetensors"))) == len(stats)


def test_gac_with_a_validation_subsample_per_step_is_deterministic(setup, tmp_path):
    """gac.val_per_group draws a few validation tuples per group and step, the same on every run;
    the weights move differently from the full-validation run but stay finite and positive."""
    den, calib = setup
    ratios = []
    for run, per_group in (("a", 2), ("b", 2), ("full", None)):
        dm = _dm(den, calib)
        hooks = GACHooks(GACConfig(meta_iters=4, meta_batch=8, meta_lr=0.5, val_per_group=per_group), dm,
                         tmp_path / run, DiagnosticsConfig(enabled=False))
        summary = run_calibration(_job(den, calib, tmp_path / run, method="gac", iters=2, hooks=hooks, units=GAC_UNITS))
        ratios.append([u["max_min_ratio"] for u in summary["gac"]["units"].values()])
    assert ratios[0] == ratios[1] and ratios[0] != ratios[2]
    assert all(math.isfinite(r) and r > 1.0 for r in ratios[0])


def test_factored_hypergradient_runs_the_same_calibration(setup, tmp_path):
    """gac.hypergradient: factored through the whole driver gives the nested run's weights (float32), with
    its J products by the double-VJP trick or by forward-mode AD (gac.jacobian_products) on gaq's real
    quantized units (AdaRound weights, fake-quantized activations)."""
    den, calib = setup
    s = {}
    for form in ("nested", "factored", "factored+forward"):
        dm = _dm(den, calib)
        hyper, _, products = form.partition("+")
        cfg = GACConfig(meta_iters=3, meta_batch=8, meta_lr=0.5, hypergradient=hyper,
                        jacobian_products=products or "reverse")
        hooks = GACHooks(cfg, dm, tmp_path / form, DiagnosticsConfig(enabled=False))
        run_calibration(_job(den, calib, tmp_path / form, method="gac", iters=2, hooks=hooks, units=GAC_UNITS))
        s[form] = hooks.weights.s.clone()
    assert not torch.allclose(s["nested"], torch.full_like(s["nested"], 1 / 32))  # the weights moved
    torch.testing.assert_close(s["factored"], s["nested"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s["factored+forward"], s["factored"], rtol=1e-4, atol=1e-5)


def test_nan_loss_names_unit_and_iteration_and_keeps_finished_units(setup, tmp_path):
    den, calib = setup
    bad = calib.subset(torch.arange(len(calib)))
    bad.x = bad.x.clone()
    bad.x[3] = float("nan")  # the time unit never sees x; the first ResBlock does
    job = _job(den, bad, tmp_path, iters=4)
    with pytest.raises(GaqError, match=r"unit down_blocks\.0\.resnets\.0, iteration \d+: the reconstruction loss is not finite"):
        run_calibration(job)
    files = sorted((tmp_path / "units").glob("*.safetensors"))
    assert [f.name for f in files] == ["000-time_embedding.safetensors"]
    # the finished unit's checkpoint is intact and is what a rerun loads
    job = _job(den, calib, tmp_path, iters=4)
    summary = run_calibration(job)
    assert summary["units"][0]["resumed_from"] == "unit-checkpoint"
    # a corrupted unit file is refused with a clear message
    files = sorted((tmp_path / "units").glob("*.safetensors"))
    files[-1].write_bytes(b"garbage")
    with pytest.raises(GaqError, match="unreadable.*delete it to recompute that unit"):
        run_calibration(_job(den, calib, tmp_path, iters=4))


def test_run_folder_of_another_config_is_refused(setup, tmp_path):
    den, calib = setup
    run_calibration(_job(den, calib, tmp_path, method="rtn"))
    job = _job(den, calib, tmp_path, method="rtn")
    job.record = {"test": "something else"}
    with pytest.raises(GaqError, match="different config"):
        run_calibration(job)


def test_uniform_weights_equal_the_unweighted_loss():
    err = torch.rand(32, dtype=torch.float32)
    from gaq.calib.weights import UniformWeights
    w = UniformWeights().weights(torch.arange(32))
    assert torch.equal((w * err).mean(), err.mean())
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(per_sample_error(a, b), (a - b).pow(2).sum(1).mean((1, 2)))


def test_the_unit_stays_in_eval_mode_during_fit(setup, tmp_path):
    """Dropout must not act during reconstruction: the FP targets were computed without it."""
    den, calib = setup
    from gaq.calib.recon import UnitReconstruction
    seen = []
    original = UnitReconstruction.training_step

    def spy(self, *args, **kwargs):
        seen.append(any(m.training for m in self.unit.modules()))
        return original(self, *args, **kwargs)

    UnitReconstruction.training_step = spy
    try:
        run_calibration(_job(den, calib, tmp_path, iters=2))
    finally:
        UnitReconstruction.training_step = original
    assert seen and not any(seen)


def test_learned_activation_steps_lower_each_units_error_and_resume(setup, tmp_path):
    """Q-Diffusion's activation phase: with act_learn_step the step sizes are tuned per unit after
    the weights, on the block-output loss; the phase is checkpointed per unit like the weights.
    At 4-bit activations their error dominates, so tuning the steps must show."""
    den, calib = setup
    quant = QuantConfig(w_bits=8, a_bits=4, act_learn_step=True)
    summary = run_calibration(_job(den, calib, tmp_path, iters=8, quant=quant, act_iters=30, act_lr=1e-3))
    acts = summary["activation_step_units"]
    assert len(acts) >= 5 and all(a["resumed_from"] == "scratch" for a in acts)
    assert sum(a["error_after"] < a["error_before"] for a in acts) >= 0.8 * len(acts), acts
    assert sum(a["error_after"] for a in acts) < sum(a["error_before"] for a in acts)
    assert len(list((tmp_path / "act" / "units").glob("*.safetensors"))) == len(acts)
    q = load_quantized(tmp_path / "quantized", den.model)
    x, t = calib.x[:4], calib.t[:4]
    cond = {k: v[:4] for k, v in calib.cond.items()}
    before = predict_noise(q, x, t, cond)
    # a rerun loads both phases from their unit checkpoints and saves the same model
    again = run_calibration(_job(den, calib, tmp_path, iters=8, quant=quant, act_iters=30, act_lr=1e-3))
    assert {a["resumed_from"] for a in again["activation_step_units"]} == {"unit-checkpoint"}
    q2 = load_quantized(tmp_path / "quantized", den.model)
    assert torch.equal(before, predict_noise(q2, x, t, cond))


def test_no_activation_phase_without_learnable_steps(setup, tmp_path):
    den, calib = setup
    summary = run_calibration(_job(den, calib, tmp_path, iters=4, act_iters=30))
    assert summary["activation_step_units"] == [] and not (tmp_path / "act").exists()


def test_gac_with_one_weight_per_timestep_group(setup, tmp_path):
    """gac.weight_per group: the run learns one logit per timestep group, and every tuple of a group
    has the same weight; the kept steps' mean weights then agree within each group."""
    den, calib = setup
    dm = _dm(den, calib)
    hooks = GACHooks(GACConfig(meta_iters=4, meta_batch=8, meta_lr=0.5, weight_per="group"), dm, tmp_path,
                     DiagnosticsConfig(enabled=False))
    summary = run_calibration(_job(den, calib, tmp_path, method="gac", iters=2, hooks=hooks, units=GAC_UNITS))
    assert hooks.weights.num_logits == dm.num_groups
    from safetensors.torch import load_file
    files = sorted((tmp_path / "gac").glob("*-s.safetensors"))
    assert files and all(load_file(str(f))["s"].shape == (dm.num_groups,) for f in files)
    groups = torch.as_tensor(dm.step_groups)
    for stats in summary["gac"]["units"].values():
        per_step = torch.tensor(stats["mean_weight_per_step"], dtype=torch.float64)
        assert stats["max_min_ratio"] > 1.0  # the group weights moved
        for g in range(dm.num_groups):
            assert torch.allclose(per_step[groups == g], per_step[groups == g][0].expand(int((groups == g).sum())))


def test_each_units_cache_is_freed_when_the_unit_ends(setup, tmp_path, monkeypatch):
    """The unit's module and its Trainer refer to each other; the driver unbinds the module, so a finished
    unit's cache is gone before the next one is built (without waiting for Python's cycle collector)."""
    import gc
    import weakref

    import gaq.calib.driver as driver

    den, calib = setup
    built, alive_at_build = [], []

    def tracked(*args, **kwargs):
        alive_at_build.append(sum(r() is not None for r in built))
        cache = build_unit_cache(*args, **kwargs)
        built.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(driver, "build_unit_cache", tracked)
    gc.collect()
    gc.disable()
    try:
        run_calibration(_job(den, calib, tmp_path, iters=2, units=GAC_UNITS))
        assert len(built) == 2 and alive_at_build == [0, 0]
        assert all(r() is None for r in built)
    finally:
        gc.enable()
