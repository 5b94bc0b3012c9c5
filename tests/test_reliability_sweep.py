"""The cases that bench/reliability.py (the reliability sweep of issue 13) found with a traceback or a wrong
outcome, each fixed: in process and fast, each asserting the exit status, the single error line and that the
files written before the failure are unchanged."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

import gaq
import gaq.cli
from gaq.calib.recon import ReconConfig
from gaq.data.datamodule import SplitConfig
from gaq.errors import GaqError
from gaq.models.loading import Denoiser, save_denoiser
from gaq.quant import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def world() -> dict[str, Path]:
    """A tiny model folder, a calibrate config whose calibration set is cached, an evaluate config and a
    finished RTN run, in a folder other users can read (pytest's own tmp folders are private to this user)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="gaq-reliability-test-"))
    os.chmod(root, 0o755)
    yield from _world(root)
    for d in root.rglob("*"):
        if d.is_dir():
            os.chmod(d, 0o755)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shared_tmp(world, request) -> Path:
    """A fresh folder any user can write (for the cases that run as another user)."""
    path = world["root"] / "cases" / request.node.name.replace("/", "_")[:80]
    path.mkdir(parents=True)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o777)
    return path


def _world(root: Path):
    model = root / "model"
    sched = DDPMScheduler(num_train_timesteps=1000)
    save_denoiser(Denoiser(make_tiny_unet(), sched.alphas_cumprod, (1, 16, 16), "class", 10, 10), model, sched)
    for f in model.rglob("*"):  # diffusers writes the weights 0600; the read-only cases run as another user
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    cfg = {
        "method": "rtn", "quant": {"w_bits": 4, "a_bits": 8, "preset": "tfmq_compat"},
        "data": {"source": str(model), "cache_dir": str(root / "calib_sets"),
                 "calib": {"steps": 4, "interval": 2, "samples_per_step": 8, "spacing": "uniform", "batch_size": 8},
                 "split": {"val_fraction": 0.25, "num_groups": 2}},
        "model": {"recon": {"iters": 2, "batch_size": 8, "ckpt_every": 0, "cache_batch": 16}},
        "trainer": CPU,
    }
    (root / "calibrate.yaml").write_text(yaml.safe_dump(cfg))
    (root / "evaluate.yaml").write_text(yaml.safe_dump({
        "source": str(model), "num_samples": 10, "batch_size": 10, "sampler": {"steps": 2},
        "reference": {"kind": "digits", "cache_dir": str(root / "eval_cache"), "max_images": 20},
        "trainer": CPU}))
    code, _, err = gaq_cli("calibrate", "--config", root / "calibrate.yaml", "--run_dir", root / "finished")
    assert code == 0, err
    yield {"root": root, "model": model, "cfg": root / "calibrate.yaml", "eval_cfg": root / "evaluate.yaml",
           "cache": root / "calib_sets", "finished": root / "finished"}


def gaq_cli(*argv) -> tuple[int, str, str]:
    """``gaq <argv>`` in this process: (exit status, stdout, stderr)."""
    import io

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            gaq.cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (the advisory .lock left out)."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        out.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.name != ".lock"})
    return out


def one_error_line(code: int, err: str, *words: str) -> str:
    """The refusal is exit 2 and one ``gaq: error:`` line (warnings aside) that names ``words``."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(" ") and ".py:" not in ln]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("gaq: error: "), err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def as_nobody():
    """As another user (root writes anywhere): real and effective ids of nobody, the saved ones kept to return."""
    if os.geteuid() != 0:
        yield
        return
    os.setresgid(65534, 65534, 0)
    os.setresuid(65534, 65534, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def batches(channels: int = 1, timesteps=(900, 100), labels: bool = True):
    g = torch.Generator().manual_seed(0)
    out = []
    for t in timesteps:
        x, y = torch.randn(8, channels, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        out.append((x, torch.full((8,), t), {"class_labels": y}) if labels else (x, torch.full((8,), t)))
    return out


def rtn_config() -> gaq.CalibrationConfig:
    return gaq.CalibrationConfig(method="rtn", quant=QuantConfig(w_bits=4, a_bits=8),
                                 split=SplitConfig(val_fraction=0.25, num_groups=2),
                                 recon=ReconConfig(iters=2, batch_size=8, ckpt_every=0, cache_batch=16))


# ------------------------------------------------------------------------------------------------ gaq calibrate
@pytest.mark.parametrize("args, says", [
    (["--method", "adaround"], "method must be rtn, uniform or gac, got 'adaround'"),
    (["--quant.w_bits", "four"], "quant.w_bits must be an integer, got 'four'"),
    (["--model.recon.cuda_graph", "yes"], "model.recon.cuda_graph must be auto, on or off, got 'yes'"),
    (["--units", "down_blocks"], "units must be a list or null, got 'down_blocks'"),
])
def test_a_value_of_the_wrong_type_says_what_the_key_takes(world, tmp_path, args, says):
    """Was 'Parser key "method": (gaq calibrate --help lists the options)', which said nothing about the value."""
    before = snapshot(world["cache"])
    code, _, err = gaq_cli("calibrate", "--config", world["cfg"], "--run_dir", tmp_path / "run", *args)
    one_error_line(code, err, says)
    assert not (tmp_path / "run").exists() and snapshot(world["cache"]) == before


@pytest.mark.parametrize("args, says", [
    (["--trainer.accelerator", "quantum"], "invalid accelerator name"),
    (["--trainer.strategy", "nope"], "invalid strategy name"),
])
def test_an_unknown_accelerator_or_strategy_is_one_line(world, tmp_path, args, says):
    """Were Lightning's ValueError tracebacks; a finished run folder given to the command stays as it was."""
    run = tmp_path / "run"
    import shutil
    shutil.copytree(world["finished"], run)
    before = snapshot(run, world["cache"])
    code, _, err = gaq_cli("calibrate", "--config", world["cfg"], "--run_dir", run, *args)
    one_error_line(code, err, says, "trainer.accelerator / trainer.devices / trainer.strategy")
    assert snapshot(run, world["cache"]) == before


@no_cuda
@pytest.mark.parametrize("verb", ["calibrate", "calib-data"])
def test_data_device_cuda_without_cuda_is_one_line(world, tmp_path, verb):
    """Was torch's 'Torch not compiled with CUDA enabled' traceback when the set had to be sampled."""
    code, _, err = gaq_cli(verb, "--config", world["cfg"], "--run_dir", tmp_path / "run", "--data.device", "cuda",
                           "--data.cache_dir", tmp_path / "sets")
    one_error_line(code, err, "data.device (sample_device) 'cuda': this machine has no cuda device", "auto or cpu")
    assert not (tmp_path / "run").exists() and not (tmp_path / "sets").exists()


def test_a_cached_calibration_set_with_nan_is_refused_naming_the_file(world, tmp_path):
    """Was 'the reconstruction loss is not finite; lower model.recon.lr' after run.json was written (RTN: a
    silently broken export)."""
    import shutil

    from gaq.data.calibset import CalibrationSet

    sets = tmp_path / "sets"
    shutil.copytree(world["cache"], sets)
    [path] = sets.glob("calib-*.safetensors")
    cs = CalibrationSet.load(path)
    cs.x[::2] = float("nan")
    cs.meta.pop("format_version")
    cs.save(path)
    before = snapshot(sets)
    code, _, err = gaq_cli("calibrate", "--config", world["cfg"], "--run_dir", tmp_path / "run",
                           "--data.cache_dir", sets)
    one_error_line(code, err, str(path), "NaN or Inf values in 8 of 16 tuples", "gaq calib-data")
    assert not (tmp_path / "run").exists() and snapshot(sets) == before


def test_a_read_only_cache_that_holds_the_set_is_only_read(world, shared_tmp):
    """Was refused as 'not writable' although nothing had to be written there."""
    import shutil

    tmp_path = shared_tmp
    sets = tmp_path / "sets"
    shutil.copytree(world["cache"], sets)
    os.chmod(sets, 0o555)
    before = snapshot(sets)
    with as_nobody():
        code, out, err = gaq_cli("calibrate", "--config", world["cfg"], "--run_dir", tmp_path / "run",
                                 "--data.cache_dir", sets)
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == str(tmp_path / "run") and snapshot(sets) == before


# ------------------------------------------------------------------------------------------------ gaq calib-data
def test_calib_data_refuses_a_cache_dir_that_is_a_file(world, tmp_path):
    """Was a FileExistsError traceback after the set had been sampled."""
    (tmp_path / "cache").write_text("x\n")
    code, _, err = gaq_cli("calib-data", "--config", world["cfg"], "--data.cache_dir", tmp_path / "cache")
    one_error_line(code, err, "cache_dir", "is a file, not a folder")
    assert (tmp_path / "cache").read_text() == "x\n"


def test_calib_data_refuses_a_read_only_cache_dir(world, shared_tmp):
    """Was safetensors' 'Permission denied' traceback after the set had been sampled."""
    tmp_path = shared_tmp
    (tmp_path / "cache").mkdir()
    os.chmod(tmp_path / "cache", 0o555)
    with as_nobody():
        code, _, err = gaq_cli("calib-data", "--config", world["cfg"], "--data.cache_dir", tmp_path / "cache")
    one_error_line(code, err, "cache_dir", "is not writable")
    assert list((tmp_path / "cache").iterdir()) == []


def test_calib_data_refuses_the_configs_bad_quantization_setting(world, tmp_path):
    """Was accepted (the set sampled and cached), although gaq calibrate refuses the same config."""
    code, _, err = gaq_cli("calib-data", "--config", world["cfg"], "--quant.w_bits", "1",
                           "--data.cache_dir", tmp_path / "sets")
    one_error_line(code, err, "w_bits must be an integer in 2..8, got 1")
    assert not (tmp_path / "sets").exists()


# ------------------------------------------------------------------------------------------------ gaq evaluate
@pytest.mark.parametrize("args, says", [
    (["--trainer.accelerator", "gpu"], "No supported gpu backend found"),
    (["--trainer.devices", "0"], "devices"),
    (["--trainer.strategy", "nope"], "invalid strategy name"),
])
def test_evaluate_trainer_placement_errors_are_one_line(world, tmp_path, args, says):
    """Were MisconfigurationException / ValueError tracebacks."""
    if args[1] == "gpu" and torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    code, _, err = gaq_cli("evaluate", "--config", world["eval_cfg"], "--out_dir", tmp_path / "out", *args)
    one_error_line(code, err, "trainer: ", says)
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_limit_predict_batches(world, tmp_path):
    """Was accepted: 10 of the 20 requested samples drawn and measured, no warning."""
    code, _, err = gaq_cli("evaluate", "--config", world["eval_cfg"], "--out_dir", tmp_path / "out",
                           "--trainer.limit_predict_batches", "1")
    one_error_line(code, err, "trainer.limit_predict_batches", "num_samples")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_an_out_dir_that_is_a_file(world, tmp_path):
    """Was a FileExistsError traceback after sampling."""
    (tmp_path / "out").write_text("x\n")
    code, _, err = gaq_cli("evaluate", "--config", world["eval_cfg"], "--out_dir", tmp_path / "out")
    one_error_line(code, err, "out_dir", "is a file, not a folder")
    assert (tmp_path / "out").read_text() == "x\n"


# ------------------------------------------------------------------------------------------------ gaq.calibrate
@pytest.mark.parametrize("kwargs, says", [
    ({"trainer": {**CPU, "max_steps": 1}}, "trainer 'max_steps' is set by gaq itself"),       # was ignored
    ({"trainer": {"accelerater": "cpu"}}, "'accelerater' is not a Lightning Trainer argument"),  # was ignored (RTN)
    ({"trainer": "cpu"}, "trainer must be a mapping"),
    ({"data": batches(channels=3)}, "x_t has 3 channels but the model takes 1"),              # was conv's RuntimeError
    ({"data": batches(labels=False)}, "needs cond 'class_labels'"),                           # was diffusers' ValueError
    ({"data": batches(timesteps=(-1, 100))}, "timesteps must be >= 0, got -1"),
    ({"model": "MODEL", "data": batches(timesteps=(5000, 100))}, "timesteps 100..5000 lie outside"),  # accepted
])
def test_calibrate_refuses_bad_trainer_arguments_and_data_in_one_line(world, tmp_path, kwargs, says):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", None)
    model = str(world["model"]) if model == "MODEL" else make_tiny_unet()
    call = {"data": batches(), "run_dir": tmp_path / "run", "trainer": CPU, **kwargs}
    with pytest.raises(GaqError) as info:
        gaq.calibrate(model, rtn_config(), call.pop("data"), **call)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@no_cuda
def test_calibrate_refuses_a_sample_device_this_machine_lacks(world, tmp_path):
    from gaq.data.calibset import CalibSetConfig

    says = r"data.device \(sample_device\) 'cuda': this machine has no cuda device"
    with pytest.raises(GaqError, match=says) as info:
        gaq.calibrate(make_tiny_unet(), rtn_config(), CalibSetConfig(steps=4, interval=2, samples_per_step=8),
                      run_dir=tmp_path / "run", trainer=CPU, scheduler=DDPMScheduler(num_train_timesteps=1000),
                      cache_dir=tmp_path / "sets", sample_device="cuda")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "sets").exists()
