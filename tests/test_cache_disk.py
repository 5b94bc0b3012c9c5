"""Disk-placed unit caches (``recon.cache_placement: disk``): a safetensors file per unit written while the
cache is filled and read back memory-mapped, the reconstruction's batches read ahead by a thread; the same
numbers as the in-memory cache, the file gone when the unit ends, bad folders refused in one line."""
from __future__ import annotations

import gc
import logging
import re
from collections import namedtuple
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler
from safetensors.torch import load_file

import gaq.calib.cache as cache_mod
from gaq.calib.cache import build_unit_cache
from gaq.calib.checkpoints import UnitCheckpoint
from gaq.calib.driver import CalibrationJob, calibrate_model, calibration_batches
from gaq.calib.recon import ReconConfig, UnitReconstruction
from gaq.calib.units import find_units, fp_counterpart
from gaq.data.calibset import CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import CalibrationDataModule, SplitConfig
from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise
from gaq.models.loading import Denoiser
from gaq.quant import QuantConfig, quantize, rounding_parameters, set_quant_state

CALIB = CalibSetConfig(steps=10, interval=2, samples_per_step=16, spacing="uniform", batch_size=16, seed=0)
UNIT = "down_blocks.0.resnets.0"
QUANT = QuantConfig(w_bits=4, a_bits=32)  # weights only: no activation calibration, the unit is what is timed


@pytest.fixture(scope="module")
def setup():
    den = Denoiser(make_tiny_unet(), DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, (1, 16, 16),
                   "class", 10, 10, source="tiny")
    return den, generate_calibration_set(den, CALIB, "cpu", progress=False)


def _trainer(unit_dir: Path, _name: str) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                      limit_val_batches=0, enable_checkpointing=False, callbacks=[UnitCheckpoint(unit_dir)])


def _job(den, calib, run_dir, **recon) -> CalibrationJob:
    dm = CalibrationDataModule("tiny", CALIB, SplitConfig(val_fraction=0.1, num_groups=5))
    dm.attach(denoiser=den, calib_set=calib).setup("fit")
    cfg = ReconConfig(**{"iters": 30, "batch_size": 8, "ckpt_every": 10, "cache_batch": 32, **recon})
    return CalibrationJob(den, dm, QUANT, "uniform", cfg, Path(run_dir), _trainer, torch.device("cpu"),
                          {"test": "disk"}, units=[UNIT])


def _rounding(qmodel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in rounding_parameters(qmodel)]


def _unit(summary) -> dict:
    return next(u for u in summary["units"] if u["name"] == UNIT)


def test_a_disk_cache_trains_bit_identically_to_memory_and_resumes(setup, tmp_path, monkeypatch, caplog):
    """Same batches in the same order: the rounding codes and per-unit errors equal the in-memory run's
    exactly; every reconstruction batch came from the read-ahead; the file is gone after the unit; a run
    killed in the unit (its file left behind, broken) resumes from the Lightning checkpoint, rebuilds the
    cache and ends with the same codes."""
    den, calib = setup
    q_mem, s_mem = calibrate_model(_job(den, calib, tmp_path / "mem", cache_placement="host"))
    with caplog.at_level(logging.INFO, logger="gaq"):
        q_disk, s_disk = calibrate_model(_job(den, calib, tmp_path / "disk", cache_placement="disk"))
    u_mem, u_disk = _unit(s_mem), _unit(s_disk)
    assert u_disk["cache_on"] == "disk" and u_disk["cache_bytes"] == u_mem["cache_bytes"]
    path = Path(u_disk["cache_file"])
    assert path.parent == tmp_path / "disk" / "cache" and path.suffix == ".safetensors" and not path.exists()
    assert (u_disk["error_before"], u_disk["error_after"]) == (u_mem["error_before"], u_mem["error_after"])
    assert all(torch.equal(a, b) for a, b in zip(_rounding(q_mem), _rounding(q_disk)))
    assert any(f"on the disk at {path}" in r.getMessage() for r in caplog.records)  # the unit's log line
    served = [re.search(r"\((\d+) batches read ahead", r.getMessage()) for r in caplog.records]
    assert [int(m.group(1)) for m in served if m] == [30]  # every iteration's batch, none gathered on the spot
    reads = u_disk["extra"]["cache_reads"]  # the same count in the unit's report (and the benches' unit rows)
    assert reads["read_ahead"] == 30 and reads["direct"] >= 0 and "cache_reads" not in u_mem["extra"]

    # killed at iteration 25 (Lightning checkpoint at 20), the cache file left behind half-written
    run = tmp_path / "killed"
    real_step = UnitReconstruction._recon_step

    def dies_at_25(self, opt, it, index, world):
        if it == 25:
            raise RuntimeError("killed")
        return real_step(self, opt, it, index, world)

    monkeypatch.setattr(UnitReconstruction, "_recon_step", dies_at_25)
    with pytest.raises(RuntimeError, match="killed"):
        calibrate_model(_job(den, calib, run, cache_placement="disk"))
    gc.collect()
    stale = run / "cache" / path.name
    assert not stale.exists()  # freed with the failed unit
    stale.write_bytes(b"half a cache")  # as kill -9 would leave it
    monkeypatch.setattr(UnitReconstruction, "_recon_step", real_step)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gaq"):
        q_res, s_res = calibrate_model(_job(den, calib, run, cache_placement="disk"))
    assert _unit(s_res)["resumed_from"] == "lightning-checkpoint" and not stale.exists()
    assert all(torch.equal(a, b) for a, b in zip(_rounding(q_mem), _rounding(q_res)))
    assert _unit(s_res)["error_after"] == u_mem["error_after"]
    served = [re.search(r"\((\d+) batches read ahead", r.getMessage()) for r in caplog.records]
    assert [int(m.group(1)) for m in served if m] == [10]  # iterations 20-29


def _built(setup, tmp_path, **kwargs):
    den, calib = setup
    qmodel = quantize(den.model, QUANT, timesteps=calib.timesteps)
    set_quant_state(qmodel, weight=False, act=False)
    b = next(calibration_batches(calib, 2))
    unit = next(u for u in find_units(qmodel, lambda: predict_noise(qmodel, b["x"], b["t"], b["cond"]))
                if u.name == UNIT)
    return build_unit_cache(qmodel, unit, den.model, fp_counterpart(unit, den.model), calibration_batches(calib, 32),
                            torch.device("cpu"), **kwargs)


def test_the_file_is_safetensors_read_zero_copy_and_read_ahead_serves_only_its_plan(setup, tmp_path):
    mem = _built(setup, tmp_path, store_dtype=torch.bfloat16)
    disk = _built(setup, tmp_path, placement="disk", store_dtype=torch.bfloat16, cache_dir=tmp_path / "c")
    assert disk.on_disk and disk.file.exists() and disk.nbytes == mem.nbytes and len(disk) == len(mem)
    stored = load_file(str(disk.file))  # a plain safetensors file, bf16 as stored
    assert torch.equal(stored["target"], disk.target) and stored["target"].dtype == torch.bfloat16
    assert torch.equal(stored["arg.0"], mem.args[0].batched)
    assert str(disk.file) in Path("/proc/self/maps").read_text()  # memory-mapped, not read into memory
    plan = [torch.tensor([5, 1, 9]), torch.tensor([0, 2]), torch.tensor([7, 7, 3])]
    disk.read_ahead(iter(plan), depth=1)
    asked = [plan[0], torch.tensor([4, 8]), plan[1], plan[2], plan[0]]  # the second and the last are not planned
    for idx in asked:
        got, want = disk.batch(idx), mem.batch(idx)
        assert all(torch.equal(a, b) for a, b in zip(got[0], want[0])) and got[1].keys() == want[1].keys()
        assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3]) and got[2].dtype == torch.float32
    assert disk.read_stats == {"read_ahead": 3, "direct": 2}
    path = disk.file
    del disk
    gc.collect()
    assert not path.exists()  # freed without close(): the finaliser removes the file


def test_a_window_serves_resident_and_staged_rows_as_the_cache_does(setup, tmp_path):
    mem = _built(setup, tmp_path)
    disk = _built(setup, tmp_path, placement="disk", cache_dir=tmp_path / "c")
    assert mem.window(None, 4) is mem  # a cache on the training device is its own window
    resident = torch.tensor([3, 11, 6])
    win = disk.window(resident, batch=4)
    plan = [torch.tensor([5, 1, 9]), torch.tensor([0, 2, 7, 8])]
    disk.read_ahead(iter(plan), depth=1)
    # planned, off-plan, a resident-only batch (nothing staged), a batch mixing both, the next planned
    for staged in (plan[0], torch.tensor([4, 10]), torch.tensor([11, 3]), torch.tensor([6, 13, 3]), plan[1]):
        win.stage(staged)
        for idx in (staged, resident):
            got, want = win.batch(idx), mem.batch(idx)
            assert all(torch.equal(a, b) for a, b in zip(got[0], want[0])) and got[1].keys() == want[1].keys()
            assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    with pytest.raises(GaqError, match="window of 4"):
        win.stage(torch.arange(12, 17))
    disk.close()


def test_auto_goes_to_disk_when_the_cache_exceeds_its_share_of_host_memory(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "available_host_memory", lambda: 10 * 2**20)
    small = _built(setup, tmp_path, placement="auto", cache_dir=tmp_path / "c", host_share=0.75)
    assert not small.on_disk  # ~1 MiB: in memory
    monkeypatch.setattr(cache_mod, "available_host_memory", lambda: 2**20)
    big = _built(setup, tmp_path, placement="auto", cache_dir=tmp_path / "c", host_share=0.75)
    assert big.on_disk and big.file.parent == tmp_path / "c"
    big.close()
    assert not big.file.exists()


def test_bad_cache_folders_and_full_disks_are_one_line_errors_before_anything_is_written(setup, tmp_path,
                                                                                          monkeypatch):
    den, calib = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(GaqError, match=r"^recon\.cache_dir .*a-file/cache cannot hold the disk caches .*not a folder"):
        calibrate_model(_job(den, calib, tmp_path / "run", cache_placement="disk", cache_dir=str(blocker / "cache")))
    assert not (tmp_path / "run").exists()
    with pytest.raises(GaqError, match="recon.cache_placement is 'disk' but no recon.cache_dir"):
        _built(setup, tmp_path, placement="disk")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: Usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(GaqError, match=r"^recon\.cache_dir .* has 0\.0 GiB free but the cache needs [\d.]+ GiB"):
        _built(setup, tmp_path, placement="disk", cache_dir=tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []
    for bad, key in ((dict(cache_placement="ssd"), "cache_placement"), (dict(cache_host_share=0.0), "cache_host_share"),
                     (dict(cache_read_ahead=0), "cache_read_ahead")):
        with pytest.raises(GaqError, match=f"recon.{key}"):
            ReconConfig(**bad)
