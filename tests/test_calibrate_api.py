"""``gaq.calibrate``, the calibration verb, as a library user calls it: on a DataLoader of batches the user
made, with a unit filter, resuming from its run folder, recording a failing unit, and refusing bad input
in one line before anything is written."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader, TensorDataset

import gaq
from gaq.calib.api import calibration_set_from_batches
from gaq.calib.recon import ReconConfig
from gaq.data.datamodule import SplitConfig
from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise
from gaq.quant import QuantConfig
from gaq.quant.quantizer import ActQuantizer

SPLIT = SplitConfig(val_fraction=0.1, num_groups=2)
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def user_loader(n_per_step: int = 12, timesteps=(900, 500, 100), seed: int = 0) -> DataLoader:
    """What a user brings: noisy images at a few timesteps with their class labels, in a DataLoader of
    ``(x_t, t, {"class_labels": y})`` batches."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_step * len(timesteps)
    x = torch.randn(n, 1, 16, 16, generator=g)
    t = torch.tensor(timesteps).repeat_interleave(n_per_step)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, t, y), batch_size=8, shuffle=False,
                      collate_fn=lambda items: (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]),
                                                {"class_labels": torch.stack([i[2] for i in items])}))


def config(method: str = "uniform", iters: int = 6, split: SplitConfig = SPLIT, **kw) -> "gaq.CalibrationConfig":
    return gaq.CalibrationConfig(method=method, quant=QuantConfig(w_bits=4, a_bits=8), split=split,
                                 recon=ReconConfig(iters=iters, batch_size=8, ckpt_every=0, cache_batch=32), **kw)


def probe_output(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 16, 16, generator=g)
    return predict_noise(model.cpu(), x, torch.tensor([900, 500, 100, 100]), {"class_labels": torch.arange(4)})


def test_user_batches_become_a_step_ordered_calibration_set():
    cs = calibration_set_from_batches(user_loader(n_per_step=4))
    assert cs.timesteps.tolist() == [900, 500, 100] and len(cs) == 12
    assert cs.step.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and torch.equal(cs.t, cs.timesteps[cs.step])
    assert set(cs.cond) == {"class_labels"} and cs.meta["source"] == "user batches"
    assert calibration_set_from_batches(user_loader(n_per_step=4)).meta["key"] == cs.meta["key"]
    assert calibration_set_from_batches(user_loader(n_per_step=4, seed=1)).meta["key"] != cs.meta["key"]


def test_calibrate_a_module_on_a_user_dataloader_returns_the_quantized_model(tmp_path):
    fp = make_tiny_unet()
    qmodel = gaq.calibrate(fp, config(units=["kind:resnet"]), user_loader(), run_dir=tmp_path / "run", trainer=CPU)
    summary = qmodel.gaq_summary
    assert summary["method"] == "uniform" and qmodel.gaq_run_dir == tmp_path / "run"
    done = {u["name"]: u["reconstructed"] for u in summary["units"]}
    assert done["down_blocks.0.resnets.0"] and not done["time_embedding"]
    assert all(v == (u["kind"] == "resnet") for u, v in zip(summary["units"], done.values()))
    # a quantized model, not the FP one, and the FP module is untouched
    assert not torch.equal(probe_output(qmodel), probe_output(fp))
    assert torch.equal(probe_output(fp), probe_output(make_tiny_unet()))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["units"] == ["kind:resnet"]
    # the same call with the same run folder resumes: every unit from its checkpoint, the same model
    again = gaq.calibrate(make_tiny_unet(), config(units=["kind:resnet"]), user_loader(), run_dir=tmp_path / "run",
                          trainer=CPU)
    assert {u["resumed_from"] for u in again.gaq_summary["units"] if u["reconstructed"]} == {"unit-checkpoint"}
    assert torch.equal(probe_output(again), probe_output(qmodel))
    # the summary stays true across the rerun: each unit keeps the figures of the run that computed it,
    # and the time is that of both runs added up
    for first, second in zip(summary["units"], again.gaq_summary["units"]):
        if first["reconstructed"]:
            assert (second["error_after"], second["seconds"]) == (first["error_after"], first["seconds"])
    assert summary["units"][1]["error_after"] is not None
    assert again.gaq_summary["calibration_seconds"] > summary["calibration_seconds"]
    assert again.gaq_summary["calibration_seconds_this_process"] < again.gaq_summary["calibration_seconds"]


def test_units_left_out_by_the_filter_keep_nearest_rounding(tmp_path):
    fp = make_tiny_unet()
    filtered = gaq.calibrate(fp, config(units=["up_blocks.*"]), user_loader(), run_dir=tmp_path / "f", trainer=CPU)
    rtn = gaq.calibrate(fp, config(method="rtn"), user_loader(), run_dir=tmp_path / "r", trainer=CPU)
    f_layers, r_layers = dict(filtered.named_modules()), dict(rtn.named_modules())
    changed = {n for n, m in f_layers.items() if hasattr(m, "weight_quantizer")
               and not torch.equal(m.weight_quantizer(m.weight), r_layers[n].weight_quantizer(r_layers[n].weight))}
    assert changed and all(n.startswith("up_blocks.") for n in changed)


def learned_act_steps(model) -> dict[str, torch.Tensor]:
    """The learnable activation step sizes of a quantized model, by quantizer name."""
    return {n: m.scale.detach().clone() for n, m in model.named_modules() if isinstance(m, ActQuantizer) and m.learn_step}


def test_the_unit_filter_applies_to_the_activation_step_phase(tmp_path):
    """With a preset that learns activation step sizes, the activation phase tunes only the units of the filter;
    the others keep the step sizes of the range calibration, exactly as a run without the phase leaves them."""
    def run(name: str, act_iters: int):
        cfg = config(units=["up_blocks.*"], iters=4)
        cfg = replace(cfg, quant=QuantConfig(w_bits=4, a_bits=8, act_learn_step=True),
                      recon=replace(cfg.recon, act_iters=act_iters, act_lr=1e-2))
        return gaq.calibrate(make_tiny_unet(), cfg, user_loader(), run_dir=tmp_path / name, trainer=CPU)

    tuned, untuned = run("tuned", act_iters=5), run("untuned", act_iters=0)
    phase = [u["name"] for u in tuned.gaq_summary["activation_step_units"]]
    assert phase and all(n.startswith("up_blocks.") for n in phase) and not untuned.gaq_summary["activation_step_units"]
    after, before = learned_act_steps(tuned), learned_act_steps(untuned)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(n.startswith("up_blocks.") for n in changed)
    assert any(not n.startswith("up_blocks.") for n in after)  # there were others to leave alone


class FailOn(pl.Callback):
    """A user's Lightning callback that breaks one unit's fit (as an out-of-memory error would)."""

    def __init__(self, unit_name: str):
        self.unit_name = unit_name

    def on_train_start(self, trainer, pl_module):
        if pl_module.unit_name == self.unit_name:
            raise RuntimeError("injected failure of this unit")


def test_a_failing_unit_is_recorded_and_skipped_on_request(tmp_path):
    fp = make_tiny_unet()
    cs = calibration_set_from_batches(list(user_loader()))
    cfg = config(on_unit_error="skip", units=["time_embedding", "down_blocks.0.resnets.0"])
    trainer = {**CPU, "callbacks": [FailOn("down_blocks.0.resnets.0")]}
    qmodel = gaq.calibrate(fp, cfg, cs, run_dir=tmp_path / "run", trainer=trainer)
    units = {u["name"]: u for u in qmodel.gaq_summary["units"]}
    bad = units["down_blocks.0.resnets.0"]
    assert not bad["reconstructed"] and "injected failure" in bad["error"]
    assert units["time_embedding"]["reconstructed"] and units["time_embedding"]["error"] is None
    assert (tmp_path / "run" / "summary.json").is_file()  # the run went on to the end
    assert [f.name for f in (tmp_path / "run" / "units").glob("*.safetensors")] == ["000-time_embedding.safetensors"]
    with pytest.raises(RuntimeError, match="injected failure"):
        gaq.calibrate(fp, config(units=["down_blocks.0.resnets.0"]), cs, run_dir=tmp_path / "raise", trainer=trainer)


def test_calibration_data_with_nan_is_refused_before_anything_is_written(tmp_path):
    cs = calibration_set_from_batches([(x.clone(), t, c) for x, t, c in user_loader()])
    cs.x[0] = float("nan")
    with pytest.raises(GaqError, match=r"NaN or Inf values in 1 of \d+ tuples") as info:
        gaq.calibrate(make_tiny_unet(), config(), cs, run_dir=tmp_path / "run", trainer=CPU)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("call, message", [
    (lambda tmp: gaq.CalibrationConfig(units=[]), "units must be a non-empty list"),
    (lambda tmp: gaq.calibrate(make_tiny_unet(), config(units=["nope*"]), user_loader(), run_dir=tmp / "a",
                               trainer=CPU), "selects none of the"),
    (lambda tmp: gaq.calibrate(make_tiny_unet(), config(), torch.zeros(3), run_dir=tmp / "b", trainer=CPU),
     "data must be a CalibrationSet"),
    (lambda tmp: gaq.calibrate(make_tiny_unet(), config(), [(torch.zeros(2, 1, 16, 16), torch.tensor([0.5, 1.0]))],
                               run_dir=tmp / "c", trainer=CPU), "integer timesteps"),
    (lambda tmp: gaq.calibrate(make_tiny_unet(), gaq.CalibrationConfig(quant=QuantConfig(preset="nope")),
                               user_loader(), run_dir=tmp / "d", trainer=CPU), "preset"),
    (lambda tmp: gaq.calibrate(make_tiny_unet(), config(), user_loader(), run_dir=tmp / "e",
                               trainer={"accelerator": "gpu", "devices": 1}), "trainer.accelerator"),
    (lambda tmp: gaq.calibrate(make_tiny_unet(), config(), run_dir=tmp / "f", trainer=CPU), "noise schedule"),
    (lambda tmp: (tmp / "g").write_text("") and None or gaq.calibrate(
        make_tiny_unet(), config(), user_loader(), run_dir=tmp / "g", trainer=CPU), "is a file, not a folder"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, call, message):
    with pytest.raises(GaqError, match=message) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)
    assert not any(p.name != "g" for p in tmp_path.iterdir())  # no run folder, no run.json


def test_a_module_with_its_scheduler_generates_its_own_calibration_set(tmp_path):
    from gaq.data.calibset import CalibSetConfig

    data = CalibSetConfig(steps=4, interval=2, samples_per_step=8, spacing="uniform", batch_size=8)
    qmodel = gaq.calibrate(make_tiny_unet(), config(method="rtn", split=SplitConfig(val_fraction=0.25, num_groups=2)),
                           data, run_dir=tmp_path / "run", trainer=CPU, scheduler=DDPMScheduler(num_train_timesteps=1000),
                           cache_dir=tmp_path / "sets")
    assert qmodel.gaq_summary["calibration_set"]["tuples"] == 16
    assert len(list((tmp_path / "sets").iterdir())) == 1
    assert type(qmodel).__name__ == "UNet2DModel"  # a diffusers model of the same class, fake-quantized


def test_a_second_writer_of_a_run_folder_is_refused_and_a_corrupt_lightning_checkpoint_is_discarded(tmp_path):
    from gaq.calib.checkpoints import RunLock

    run = tmp_path / "run"
    with RunLock(run):  # another process (here: another lock holder) is writing the folder
        with pytest.raises(GaqError, match=r"is in use by pid \d+ on "):
            gaq.calibrate(make_tiny_unet(), config(method="rtn"), user_loader(), run_dir=run, trainer=CPU)
    # a unit's half-written Lightning checkpoint: discarded with a warning, the unit restarts, the run finishes
    ckpt = run / "lightning" / "001" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    qmodel = gaq.calibrate(make_tiny_unet(), config(units=["down_blocks.0.resnets.0"]), user_loader(), run_dir=run,
                           trainer=CPU)
    unit = next(u for u in qmodel.gaq_summary["units"] if u["name"] == "down_blocks.0.resnets.0")
    assert unit["reconstructed"] and unit["resumed_from"] == "scratch"
    # files are written with the user's umask, not safetensors' private 0600
    mode = (run / "quantized" / "quantized.safetensors").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_gac_on_a_disk_cache_gives_the_numbers_of_the_in_memory_cache(tmp_path):
    """A cache off the training device serves its batches through a device window (the validation tuples resident,
    each step's batch staged): the codes and the learned sample weights are those of the in-memory cache."""
    from gaq.calib.gac import GACConfig

    def run(name: str, **recon):
        cfg = config("gac", iters=5, units=["down_blocks.0.resnets.0"], gac=GACConfig(meta_iters=3, meta_batch=8,
                                                                                      meta_lr=1e-2))
        cfg = replace(cfg, recon=replace(cfg.recon, **recon))
        return gaq.calibrate(make_tiny_unet(), cfg, user_loader(), run_dir=tmp_path / name, trainer=CPU)

    mem, disk = run("mem"), run("disk", cache_placement="disk", cache_dir=str(tmp_path / "c"))
    (u_mem,), (u_disk,) = ([u for u in q.gaq_summary["units"] if u["reconstructed"]] for q in (mem, disk))
    assert u_disk["cache_on"] == "disk" and u_mem["cache_on"] == "device"
    assert (u_disk["error_before"], u_disk["error_after"]) == (u_mem["error_before"], u_mem["error_after"])
    assert all(torch.equal(a, b) for a, b in zip(mem.state_dict().values(), disk.state_dict().values()))
    assert u_mem["extra"]["gac"] and u_disk["extra"]["gac"] == u_mem["extra"]["gac"]  # the weights' figures
    assert "cache_reads" in u_disk["extra"] and "cache_reads" not in u_mem["extra"]  # only a cache off the device
