"""`gaq calibrate` end to end through LightningCLI, as a user runs it: straight runs, kill -9 and
resume, 2-process DDP on CPU (gloo), and the one-line errors for bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_unet
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from gaq.models.loading import Denoiser, save_denoiser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    sched = DDPMScheduler(num_train_timesteps=1000)
    save_denoiser(Denoiser(make_tiny_unet(), sched.alphas_cumprod, (1, 16, 16), "class", 10, 10), folder, sched)
    return folder


def write_config(tmp: Path, model_dir: Path, method: str = "uniform", iters: int = 12, **extra) -> Path:
    cfg = {
        "method": method,
        "quant": {"w_bits": 4, "a_bits": 8, "preset": "tfmq_compat"},
        "data": {"source": str(model_dir), "cache_dir": str(tmp / "calib_sets"),
                 "calib": {"steps": 10, "interval": 2, "samples_per_step": 16, "spacing": "uniform", "batch_size": 16},
                 "split": {"val_fraction": 0.1, "num_groups": 5}},
        "model": {"recon": {"iters": iters, "batch_size": 8, "ckpt_every": 3, "cache_batch": 40}},
        "gac": {"meta_iters": 4, "meta_batch": 8},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    for key, value in extra.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / f"calibrate-{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def gaq(*args: str, timeout: int = 300, check: bool = True, subprocess_run: bool = False):
    """Run ``gaq <args>`` as a user does: in this process (the default: a fresh interpreter costs seconds of
    imports), or, with ``subprocess_run`` (DDP, whose launcher re-runs the command line), in a new one."""
    if subprocess_run:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-m", "gaq.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
    else:
        import contextlib
        import io
        import types

        import gaq.cli

        out, err, code = io.StringIO(), io.StringIO(), 0
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                gaq.cli.main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            os.chdir(cwd)
        proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"gaq {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def quantized_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "quantized" / "quantized.safetensors"))


def test_calibrate_prints_run_folder_and_writes_summary(tmp_path, model_dir):
    cfg = write_config(tmp_path, model_dir)
    out = gaq("calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "run"))
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "run")
    import json
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "uniform" and summary["w_bits"] == 4 and summary["a_bits"] == 8
    assert summary["num_units"] == len(summary["units"]) > 5 and summary["device"] == "cpu"
    for key in ("calibration_seconds", "peak_memory_bytes", "git_commit", "stored_weight_bytes", "preset", "model"):
        assert key in summary
    # rerunning the same command reuses every finished unit and ends with the same model
    before = quantized_tensors(tmp_path / "run")
    gaq("calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {u["resumed_from"] for u in summary["units"]} == {"unit-checkpoint"}
    after = quantized_tensors(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kill_9_mid_unit_then_resume_equals_straight_run(tmp_path, model_dir):
    # the first five units (the rest keep nearest rounding): the kill lands in the third
    cfg = write_config(tmp_path, model_dir, iters=30, units=["time_embedding", "down_blocks.*"])
    gaq("calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "straight"))
    run = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "gaq.cli", "calibrate", "--config", str(cfg), "--run_dir", str(run)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    target = run / "lightning" / "002" / "last.ckpt"   # inside the third unit, after a few iterations
    while time.time() < deadline and not target.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert target.exists(), "the run never reached the third unit"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    gaq("calibrate", "--config", str(cfg), "--run_dir", str(run))
    import json
    kinds = [u["resumed_from"] for u in json.loads((run / "summary.json").read_text())["units"]]
    assert kinds[:2] == ["unit-checkpoint"] * 2 and kinds[2] == "lightning-checkpoint", kinds
    a, b = quantized_tensors(tmp_path / "straight"), quantized_tensors(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_two_process_ddp_matches_one_process(tmp_path, model_dir):
    """GAC under DDP (its reconstruction iterations are uniform's, plus the meta steps) equals one process."""
    # three units under DDP (the unit filter; the rest keep nearest rounding): the time unit, a ResBlock, attention
    cfg = write_config(tmp_path, model_dir, method="gac", iters=6,
                       units=["time_embedding", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0"])
    gaq("calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "one"))
    gaq("calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "two"), "--trainer.devices", "2",
        "--trainer.strategy", "ddp", timeout=400, subprocess_run=True)
    a, b = quantized_tensors(tmp_path / "one"), quantized_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    codes = [k for k in a if a[k].dtype in (torch.uint8, torch.int8)]
    same = sum(int((a[k] == b[k]).sum()) for k in codes)
    total = sum(a[k].numel() for k in codes)
    assert total > 0 and same / total > 0.999, (same, total)
    floats = [k for k in a if a[k].is_floating_point()]
    for k in floats:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    (["--quant.w_bits", "9"], "w_bits"),
    (["--quant.preset", "nope"], "preset"),
    (["--data.split.val_fraction", "1.5"], "val_fraction"),
    (["--data.source", "/no/such/model"], "/no/such/model"),
    (["--no_such_key", "1"], "no_such_key"),
    (["--data.calib.interval", "50"], "interval"),
    (["--trainer.accelerator", "gpu"], "trainer.accelerator"),
    (["--units", "[no_such_unit]"], "selects none of the"),
])
def test_bad_input_gets_one_clear_error_line(tmp_path, model_dir, capsys, override, message):
    """In process (a subprocess per case cost seconds each): the error line names the setting, no traceback,
    and nothing is written to the run folder."""
    import gaq.cli

    cfg = write_config(tmp_path, model_dir)
    with pytest.raises(SystemExit) as info:
        gaq.cli.main(["calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "r"), *override])
    assert info.value.code not in (0, None)
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert err and message in err[-1], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "r" / "run.json").exists()


def test_sample_grid_callback_runs_after_calibration(tmp_path, model_dir):
    cfg = write_config(tmp_path, model_dir, method="uniform", iters=2, **{"trainer.callbacks": [{
        "class_path": "gaq.eval.callbacks.SampleGridCallback",
        "init_args": {"per_class": 2, "every_n_units": 4, "sampling": {"batch_size": 20, "sampler": {"steps": 3}}}}]})
    gaq("calibrate", "--config", str(cfg), "--run_dir", str(tmp_path / "run"))
    grids = list((tmp_path / "run").rglob("samples_grid.png"))
    assert len(grids) == 1 and grids[0].stat().st_size > 0
    # and one grid of the partly calibrated model every 4 units
    import json
    units = json.loads((tmp_path / "run" / "summary.json").read_text())["num_units"]
    per_unit = sorted(p.name for p in (grids[0].parent / "units").glob("grid_unit_*.png"))
    assert per_unit == [f"grid_unit_{k:03d}.png" for k in range(3, units, 4)] and per_unit
    import json
    assert "SampleGridCallback" in json.loads((tmp_path / "run" / "summary.json").read_text())["callbacks"]


def test_help_lists_gaqs_own_options_before_the_trainers(capsys):
    import gaq.cli

    with pytest.raises(SystemExit) as info:
        gaq.cli.main(["calibrate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    for key in ("--method", "--quant.w_bits", "--model.recon.iters", "--gac.meta_lr", "--units", "--run_dir"):
        assert f"\n  {key}" in options, key
        assert options.index(f"\n  {key}") < options.index("\n  --trainer.accelerator"), key
    assert "--optimizer" not in text and "trainer.max_steps and the like are refused" in text
