"""Reliability sweep: every bad input of issue 13 and more, as a new user would try them, plus kill -9 and resume.

Runs each case against a tiny class-conditional UNet built here (no downloads, CPU) and records, per case, the
command or API call, the exit code (or exception type), the last line of stderr, the number of stderr lines,
whether the files written before the failure are unchanged (sha256 of every file of the run / cache folders
before and after; the advisory ``.lock`` file is left out) and a verdict:

- ``one-line error``: refused, exit 2, no traceback, the only line that is not a Python / Lightning warning is
  ``gaq: error: ...`` (API: a :class:`gaq.errors.GaqError` of one line);
- ``multi-line error``: refused without a traceback but in more than one line;
- ``traceback``: an uncaught exception (CLI: its traceback; API: any exception type but ``GaqError``);
- ``accepted (correct)``: a valid input (or a damaged file gaq repairs itself) that did what it should, checked;
- ``WRONG outcome``: a bad input accepted, a valid one refused, a wrong result, or files written before a
  failure changed.

CLI cases run in this process (``gaq.cli.main(argv)``, stdout and stderr captured at the file-descriptor
level): a new Python process costs about 13 s of imports on a 2-core CPU. Only the kill -9 trials start
processes: ``gaq calibrate`` in a subprocess, SIGKILLed at a random moment after its first unit checkpoint,
then resumed (in this process) and its export compared tensor by tensor with an uninterrupted run.

    python bench/reliability.py --out bench/results/reliability.md           # everything (~7 min, 2 cores)
    python bench/reliability.py --out /tmp/rel.md --quick                    # no kill trials
    python bench/reliability.py --out /tmp/rel.md --only 'calibrate*'        # a subset (fnmatch on case ids)

Writes the table to ``--out`` and everything (with each case's full stderr tail) to the ``.json`` beside it.
Exit status 1 if any case's verdict is ``traceback`` or ``WRONG outcome``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

# ============================================================================================ capture

WARNING_LINE = re.compile(r"^\S+\.py:\d+: ")  # Python's and Lightning's warning format: "path.py:123: message"


@dataclass
class Result:
    code: Any = 0                  # exit status (CLI) or exception type name / "returned" (API)
    stdout: str = ""
    stderr: str = ""
    exc: BaseException | None = None
    value: Any = None
    seconds: float = 0.0

    @property
    def stderr_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def last_line(self) -> str:
        lines = self.stderr_lines
        return lines[-1].strip() if lines else ""

    @property
    def error_lines(self) -> list[str]:
        """stderr lines that are not warnings (a warning line and its indented source line)."""
        out, in_warning = [], False
        for ln in self.stderr_lines:
            if WARNING_LINE.match(ln):
                in_warning = True
                continue
            if in_warning and ln.startswith((" ", "\t")):
                continue
            in_warning = False
            out.append(ln)
        return out

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def captured(fn: Callable[[], Any]) -> Result:
    """Run ``fn()`` with fd 1 and 2 redirected to files (Python, Rich and C-level output alike)."""
    res = Result()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        saved = os.dup(1), os.dup(2)
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        t0 = time.perf_counter()
        try:
            res.value = fn()
        except SystemExit as err:
            res.code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # what a real process would print before exiting 1
            res.exc = err
            res.code = 1
            sys.stderr.write(traceback.format_exc())
        finally:
            res.seconds = time.perf_counter() - t0
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fo.seek(0)
        fe.seek(0)
        res.stdout = fo.read().decode("utf-8", "replace")
        res.stderr = fe.read().decode("utf-8", "replace")
    return res


def cli(*argv: str) -> Result:
    """``gaq <argv>`` in this process, from the repository root."""
    import gaq.cli

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return captured(lambda: gaq.cli.main([str(a) for a in argv]))
    finally:
        os.chdir(cwd)


def cli_subprocess(*argv: str, timeout: int = 300) -> Result:
    """``gaq <argv>`` in a new process: for a case that can take the whole process down (a crash in native code)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gaq.cli", *[str(a) for a in argv]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, seconds=time.perf_counter() - t0)


def api(fn: Callable[[], Any]) -> Result:
    """A Python API call: the exception it raises (not printed as a traceback by us) or its value."""
    holder: dict[str, Any] = {}

    def call():
        try:
            holder["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - recorded, judged below
            holder["exc"] = err
            holder["tb"] = traceback.format_exc()

    res = captured(call)
    res.value, res.exc = holder.get("value"), holder.get("exc")
    res.code = type(res.exc).__name__ if res.exc is not None else "returned"
    if res.exc is not None:
        res.stderr += f"{type(res.exc).__name__}: {res.exc}\n"
        res.tb = holder["tb"]
    return res


@contextlib.contextmanager
def as_nobody():
    """Run as user nobody (real and effective ids; saved ids stay root to switch back): a read-only folder is
    read-only only for a user other than root. Outside root, a no-op (0555 folders are read-only already)."""
    if os.geteuid() != 0:
        yield
        return
    os.setresgid(NOBODY, NOBODY, 0)
    os.setresuid(NOBODY, NOBODY, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


# ============================================================================================ files

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


PROGRESS_BEFORE: dict[str, float] = {}   # progress.json's seconds at the last before-snapshot


def snapshot(paths: list[Path], before: bool = False) -> dict[str, str]:
    """sha256 of every file under ``paths`` (a file or a folder), the advisory ``.lock`` left out."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            if f.name != ".lock":
                out[str(f)] = sha256(f)
                if before and f.name == "progress.json":
                    PROGRESS_BEFORE[str(f)] = json.loads(f.read_text())["seconds"]
    return out


def compare(before: dict[str, str], after: dict[str, str]) -> str:
    if before == after:
        return "yes"
    account = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
    if all(Path(k).name == "progress.json" for k in account) and all(k in before and k in after for k in account):
        # the run's time account (seconds every process spent on the run, README): a failing process adds its own
        grown = sum(json.loads(Path(k).read_text())["seconds"] for k in account) - sum(
            PROGRESS_BEFORE.get(k, 0.0) for k in account)
        return f"yes, but progress.json (the run's time account) grew by this attempt's {grown:.2f} s"
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = []
    for what, items in (("new", new), ("changed", changed), ("removed", gone)):
        if items:
            parts.append(f"{len(items)} {what} ({Path(items[0]).name}{', ...' if len(items) > 1 else ''})")
    return "no: " + "; ".join(parts)


def export_tensors(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "quantized" / "quantized.safetensors"))


def same_export(a: Path, b: Path) -> bool:
    import torch

    ta, tb = export_tensors(a), export_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def summary(run: Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())


def set_yaml(path: Path, data: dict, **overrides) -> Path:
    import copy

    import yaml

    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# ============================================================================================ the tiny world

NUM_CLASSES = 10
UNITS = ["down_blocks.0.resnets.0", "up_blocks.1.resnets.0"]   # the reconstructed units (the rest: nearest)


def tiny_unet(seed: int = 0):
    """A class-conditional UNet2DModel, 16x16x1, one attention down and up block (tests/conftest.py's)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1, attention_head_dim=8,
    ).eval()


def nan_unet():
    import torch

    m = tiny_unet()
    with torch.no_grad():
        m.conv_in.weight[0] = float("nan")
    return m


def user_batches(n_per_step: int = 8, timesteps=(900, 500, 100), seed: int = 0, channels: int = 1,
                 t_dtype=None, nan: bool = False, labels: bool = True):
    """What an API user brings: a list of ``(x_t, t, {"class_labels": y})`` batches."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = n_per_step * len(timesteps)
    x = torch.randn(n, channels, 16, 16, generator=g)
    if nan:
        x[::2] = float("nan")
    t = torch.tensor(timesteps).repeat_interleave(n_per_step)
    if t_dtype is not None:
        t = t.to(t_dtype) + (0.5 if t_dtype.is_floating_point else 0)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    out = []
    for i in range(0, n, 8):
        out.append((x[i:i + 8], t[i:i + 8], {"class_labels": y[i:i + 8]}) if labels else (x[i:i + 8], t[i:i + 8]))
    return out


class World:
    """The sweep's folders: tiny model folders, the base YAMLs, a shared calibration-set cache and one
    finished run that cases copy."""

    def __init__(self, work: Path):
        from diffusers import DDPMScheduler

        from gaq.toy.classifier import ClassifierConfig, DigitClassifier, save_classifier
        from gaq.models.loading import Denoiser, save_denoiser
        import torch

        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)  # the read-only cases run as nobody: they must read the models and configs
        sched = DDPMScheduler(num_train_timesteps=1000)
        self.model = work / "model"
        self.nan_model = work / "model_nan"
        self.other_model = work / "model_other"
        for folder, unet in ((self.model, tiny_unet()), (self.nan_model, nan_unet()), (self.other_model, tiny_unet(1))):
            save_denoiser(Denoiser(unet, sched.alphas_cumprod, (1, 16, 16), "class", NUM_CLASSES, NUM_CLASSES),
                          folder, sched)
        for folder in (self.model, self.nan_model, self.other_model):  # diffusers writes weights 0600
            for f in folder.rglob("*"):
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
        torch.manual_seed(0)
        save_classifier(DigitClassifier(ClassifierConfig(channels=(8, 16), feature_dim=16)), self.model / "classifier")
        self.cache = work / "calib_sets"
        self.calibrate = {   # tests/test_calibrate_cli.py's tiny settings, two reconstructed units
            "method": "uniform",
            "quant": {"w_bits": 4, "a_bits": 8, "preset": "tfmq_compat"},
            "data": {"source": str(self.model), "cache_dir": str(self.cache),
                     "calib": {"steps": 10, "interval": 2, "samples_per_step": 16, "spacing": "uniform",
                               "batch_size": 16},
                     "split": {"val_fraction": 0.1, "num_groups": 5}},
            "model": {"recon": {"iters": 12, "batch_size": 8, "ckpt_every": 3, "cache_batch": 40}},
            "gac": {"meta_iters": 4, "meta_batch": 8},
            "units": list(UNITS),
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        }
        self.evaluate = {   # tests/test_evaluate.py's tiny settings
            "source": str(self.model), "num_samples": 20, "batch_size": 10, "seed": 0,
            "sampler": {"steps": 5, "guidance_scale": 2.0}, "features": str(self.model / "classifier"),
            "reference": {"kind": "digits", "cache_dir": str(work / "eval_cache"), "max_images": 200},
            "metrics": {"inception": "auto"}, "grid": {"per_class": 2, "scale": 1},
            "timestep_error": {"num_samples": 4, "batch_size": 4},
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        }
        self.cfg = set_yaml(work / "calibrate.yaml", self.calibrate)
        self.eval_cfg = set_yaml(work / "evaluate.yaml", self.evaluate)
        self.finished = work / "finished_run"   # one straight run, copied by the cases that need a run folder
        res = cli("calibrate", "--config", self.cfg, "--run_dir", self.finished)
        if res.code != 0:
            raise SystemExit(f"the baseline run failed:\n{res.stderr[-3000:]}")
        self.baseline_seconds = res.seconds
        self.export = work / "export"           # an API export (gaq.quantize + save_quantized)
        import gaq
        from gaq.quant import QuantConfig
        gaq.save_quantized(gaq.quantize(tiny_unet(), QuantConfig(w_bits=4, a_bits=32)), self.export)

    def calib_file(self) -> Path:
        [path] = sorted(self.cache.glob("calib-*.safetensors"))
        return path

    def copy_run(self, dest: Path) -> Path:
        shutil.copytree(self.finished, dest)
        return dest

    def unit_index(self, name: str) -> str:
        [p] = (self.finished / "units").glob(f"*-{name}.json")
        return p.name.split("-")[0]

    def interrupted_run(self, dest: Path, unit: str = UNITS[-1]) -> tuple[Path, Path]:
        """A copy of the finished run as a kill inside ``unit`` leaves it: no export, no summary, no unit
        checkpoint for ``unit``, its Lightning ``last.ckpt`` there. Returns (run, last.ckpt)."""
        run = self.copy_run(dest)
        idx = self.unit_index(unit)
        for p in [run / "quantized", run / "summary.json", *(run / "units").glob(f"{idx}-*")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return run, run / "lightning" / idx / "last.ckpt"


# ============================================================================================ cases

@dataclass
class Case:
    id: str
    area: str                                 # calibrate | calib-data | evaluate | gaq | api
    what: str                                 # the bad input, in words
    run: Callable[["Ctx"], Result]            # does it (and its set-up); ctx.watch set before the failing call
    expect: str = "error"                     # error | accept
    hint: str | None = None                   # a word the error line should contain
    check: Callable[["Ctx", Result], tuple[bool, str]] | None = None   # accept: is the outcome right?
    command: str = ""                         # filled in by ctx.cli / ctx.api


class Ctx:
    """One case's folder, the files it watches and the command it ran."""

    def __init__(self, world: World, case: Case):
        self.w, self.case = world, case
        self.dir = world.work / "cases" / case.id
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.run_dir = self.dir / "run"
        self.watch: list[Path] | None = None
        self.before: dict[str, str] | None = None
        self.notes: list[str] = []

    def arm(self, *paths: Path) -> None:
        """Take the before-snapshot of ``paths`` now (default: this case's run folder and the cache)."""
        self.watch = list(paths) if paths else [self.run_dir, self.w.cache]
        self.before = snapshot(self.watch, before=True)

    def short(self, text: str) -> str:
        return text.replace(str(self.dir), "$C").replace(str(self.w.work), "$W").replace(str(ROOT) + "/", "")

    def cli(self, *argv, arm: bool = True, record: bool = True, new_process: bool = False) -> Result:
        if arm and self.before is None:
            self.arm()
        if record:
            self.case.command = self.short(shlex.join(["gaq", *[str(a) for a in argv]]))
        return cli_subprocess(*argv) if new_process else cli(*argv)

    def calibrate(self, *extra, config: Path | None = None, run_dir: Path | None = None, **kw) -> Result:
        return self.cli("calibrate", "--config", config or self.w.cfg, "--run_dir", run_dir or self.run_dir, *extra,
                        **kw)

    def api(self, text: str, fn: Callable[[], Any], arm: bool = True) -> Result:
        if arm and self.before is None:
            self.arm()
        self.case.command = self.short(text)
        return api(fn)


CASES: list[Case] = []


class _ById(dict):
    def __missing__(self, key):
        return next(c for c in CASES if c.id == key)


CASES_BY_ID = _ById()


def case(id: str, area: str, what: str, expect: str = "error", hint: str | None = None, check=None):
    def deco(fn):
        CASES.append(Case(id, area, what, fn, expect, hint, check))
        return fn
    return deco


def simple(id: str, what: str, *extra: str, hint: str | None = None, area: str = "calibrate") -> None:
    """A calibrate (or calib-data) case: the base config plus ``extra`` on a fresh run folder."""
    if area == "calibrate":
        CASES.append(Case(id, area, what, lambda ctx: ctx.calibrate(*extra), "error", hint))
    else:
        CASES.append(Case(id, area, what, lambda ctx: ctx.cli("calib-data", "--config", ctx.w.cfg, *extra),
                          "error", hint))


def finished_ok(ctx: Ctx, res: Result, run: Path | None = None) -> tuple[bool, str]:
    run = run or ctx.run_dir
    out = res.stdout.strip().splitlines()
    ok = res.code == 0 and out and out[-1] == str(run) and (run / "quantized" / "quantized.safetensors").is_file()
    return bool(ok), "" if ok else f"exit {res.code}, last stdout line {out[-1] if out else ''!r}"


def same_as_baseline(ctx: Ctx, res: Result, run: Path | None = None) -> tuple[bool, str]:
    ok, note = finished_ok(ctx, res, run)
    if not ok:
        return ok, note
    same = same_export(ctx.w.finished, run or ctx.run_dir)
    return same, "export bit-identical to the straight run" if same else "export differs from the straight run"


# ---------------------------------------------------------------- calibrate: quantization settings
simple("calibrate.w_bits_1", "weight bits below the range (2..8)", "--quant.w_bits", "1", hint="w_bits")
simple("calibrate.w_bits_9", "weight bits above the range", "--quant.w_bits", "9", hint="w_bits")
simple("calibrate.a_bits_16", "activation bits 16 (range 4..8 or 32)", "--quant.a_bits", "16", hint="a_bits")
simple("calibrate.a_bits_3", "activation bits 3 (range 4..8 or 32)", "--quant.a_bits", "3", hint="a_bits")
simple("calibrate.preset_unknown", "unknown preset", "--quant.preset", "nope", hint="preset")
simple("calibrate.preset_missing_file", "preset path that does not exist", "--quant.preset", "/no/such/preset.yaml",
       hint="preset")
simple("calibrate.keep_fp_roles_unknown", "unknown layer role in keep_fp_roles", "--quant.keep_fp_roles", "[nope]",
       hint="nope")
simple("calibrate.softmax_bits_0", "softmax bits 0", "--quant.softmax_bits", "0", hint="softmax_bits")
simple("calibrate.act_ema_momentum_1", "activation EMA momentum 1.5", "--quant.act_ema_momentum", "1.5",
       hint="act_ema_momentum")
simple("calibrate.w_bits_text", "weight bits as text", "--quant.w_bits", "four", hint="w_bits")


@case("calibrate.corrected_after_refusal", "calibrate", "the corrected command on the run folder of a refused "
      "--quant.w_bits 1", expect="accept", check=finished_ok)
def _(ctx):
    cli("calibrate", "--config", ctx.w.cfg, "--run_dir", ctx.run_dir, "--quant.w_bits", "1")
    return ctx.calibrate(arm=False)


@case("calibrate.edge_bits_w2a32", "calibrate", "the edges of the documented ranges (W2, A32)", expect="accept",
      check=finished_ok)
def _(ctx):
    return ctx.calibrate("--quant.w_bits", "2", "--quant.a_bits", "32", "--method", "rtn", arm=False)


# ---------------------------------------------------------------- calibrate: engine options
simple("calibrate.trainer_max_steps", "trainer.max_steps (the engine sets its own loop)", "--trainer.max_steps", "1",
       hint="trainer.max_steps")
simple("calibrate.trainer_max_epochs", "trainer.max_epochs", "--trainer.max_epochs", "3", hint="trainer.max_epochs")
simple("calibrate.trainer_limit_train_batches", "trainer.limit_train_batches", "--trainer.limit_train_batches", "2",
       hint="limit_train_batches")
simple("calibrate.trainer_grad_clip", "trainer.gradient_clip_val", "--trainer.gradient_clip_val", "1.0",
       hint="gradient_clip_val")
simple("calibrate.optimizer", "--optimizer (LightningCLI's, not used)", "--optimizer", "Adam", hint="optimizer")
simple("calibrate.lr_scheduler", "--lr_scheduler", "--lr_scheduler", "StepLR", hint="lr_scheduler")
simple("calibrate.recon_iters_neg", "negative reconstruction iterations", "--model.recon.iters", "-1", hint="iters")
simple("calibrate.recon_batch_0", "reconstruction batch size 0", "--model.recon.batch_size", "0", hint="batch_size")
simple("calibrate.recon_lr_0", "learning rate 0", "--model.recon.lr", "0", hint="lr")
simple("calibrate.recon_lr_text", "learning rate as text", "--model.recon.lr", "fast", hint="lr")
simple("calibrate.recon_cuda_graph_bad", "cuda_graph value not in auto|on|off", "--model.recon.cuda_graph", "yes",
       hint="cuda_graph")
simple("calibrate.recon_key_typo", "misspelt recon key", "--model.recon.iter", "10", hint="iter")
simple("calibrate.trainer_devices_0", "trainer.devices 0", "--trainer.devices", "0", hint="devices")
simple("calibrate.trainer_gpu", "trainer.accelerator gpu on a CPU machine", "--trainer.accelerator", "gpu",
       hint="accelerator")
simple("calibrate.trainer_accel_bogus", "unknown accelerator", "--trainer.accelerator", "quantum", hint="accelerator")
simple("calibrate.trainer_precision_bad", "unknown trainer precision", "--trainer.precision", "13", hint="precision")
simple("calibrate.trainer_strategy_bad", "unknown strategy", "--trainer.strategy", "nope", hint="strategy")
simple("calibrate.method_unknown", "unknown method", "--method", "adaround", hint="method")
simple("calibrate.gac_meta_iters_neg", "GAC meta iterations -1", "--method", "gac", "--gac.meta_iters", "-1",
       hint="meta_iters")
simple("calibrate.unknown_key", "an option that does not exist", "--no_such_key", "1", hint="no_such_key")
simple("calibrate.units_none_match", "a unit filter that matches nothing", "--units", "[no_such_unit]",
       hint="no_such_unit")
simple("calibrate.units_empty", "an empty unit filter", "--units", "[]", hint="units")
simple("calibrate.units_not_a_list", "a unit filter that is not a list", "--units", "down_blocks", hint="units")
simple("calibrate.on_unit_error_bad", "on_unit_error not raise|skip", "--on_unit_error", "ignore",
       hint="on_unit_error")


# ---------------------------------------------------------------- calibrate: data
simple("calibrate.source_missing", "a model folder that does not exist", "--data.source", "/no/such/model",
       hint="/no/such/model")
simple("calibrate.calib_steps_0", "0 sampling steps", "--data.calib.steps", "0", hint="steps")
simple("calibrate.calib_interval", "interval larger than the steps", "--data.calib.interval", "50", hint="interval")
simple("calibrate.calib_samples_0", "0 samples per step", "--data.calib.samples_per_step", "0",
       hint="samples_per_step")
simple("calibrate.val_fraction", "validation fraction 1.5", "--data.split.val_fraction", "1.5", hint="val_fraction")
simple("calibrate.num_groups_0", "0 timestep groups", "--data.split.num_groups", "0", hint="num_groups")
simple("calibrate.classes_out_of_range", "a class label the model does not have", "--data.calib.classes", "[42]",
       hint="42")
simple("calibrate.embeddings_for_class_model", "prompt embeddings for a class-conditional model",
       "--data.calib.cond_embeddings", "/no/such/emb.safetensors", hint="cond_embeddings")
simple("calibrate.prompts_missing", "a prompt file for a class-conditional model", "--data.calib.prompts",
       "/no/such/prompts.txt", hint="prompts")


@case("calibrate.data_device_cuda", "calibrate", "data.device cuda on a CPU machine (the set is not cached yet)",
      hint="cuda")
def _(ctx):
    ctx.arm(ctx.run_dir, ctx.dir / "sets")
    return ctx.calibrate("--data.device", "cuda", "--data.cache_dir", ctx.dir / "sets")


@case("calibrate.source_not_a_model", "calibrate", "a model folder that holds no model", hint="model")
def _(ctx):
    (ctx.dir / "empty_model").mkdir(exist_ok=True)
    return ctx.calibrate("--data.source", ctx.dir / "empty_model")


@case("calibrate.nan_weights", "calibrate", "a model with NaN weights", hint="NaN")
def _(ctx):
    return ctx.calibrate("--data.source", ctx.w.nan_model, "--data.cache_dir", ctx.dir / "sets")


# ---------------------------------------------------------------- calibrate: config files
@case("calibrate.config_empty", "calibrate", "an empty YAML config", hint="empty")
def _(ctx):
    (ctx.dir / "empty.yaml").write_text("\n")
    return ctx.calibrate(config=ctx.dir / "empty.yaml")


@case("calibrate.config_missing", "calibrate", "a config file that does not exist", hint="no such file")
def _(ctx):
    return ctx.calibrate(config=ctx.dir / "nope.yaml")


@case("calibrate.config_bad_yaml", "calibrate", "a config that is not valid YAML", hint="YAML")
def _(ctx):
    (ctx.dir / "bad.yaml").write_text("quant: {w_bits: 4\nmethod: [\n")
    return ctx.calibrate(config=ctx.dir / "bad.yaml")


@case("calibrate.config_a_list", "calibrate", "a YAML config that is a list", hint="mapping")
def _(ctx):
    (ctx.dir / "list.yaml").write_text("- quant\n- method\n")
    return ctx.calibrate(config=ctx.dir / "list.yaml")


@case("calibrate.config_unknown_section", "calibrate", "a YAML config with an unknown section", hint="quantization")
def _(ctx):
    return ctx.calibrate(config=set_yaml(ctx.dir / "c.yaml", ctx.w.calibrate, **{"quantization.w_bits": 4}))


# ---------------------------------------------------------------- calibrate: output locations
@case("calibrate.run_dir_is_file", "calibrate", "--run_dir names a file", hint="is a file")
def _(ctx):
    ctx.run_dir.write_text("not a folder\n")
    return ctx.calibrate()


@case("calibrate.cache_dir_is_file", "calibrate", "data.cache_dir names a file (the set is not cached yet)",
      hint="is a file")
def _(ctx):
    (ctx.dir / "cache").write_text("not a folder\n")
    ctx.arm(ctx.run_dir, ctx.dir / "cache")
    return ctx.calibrate("--data.cache_dir", ctx.dir / "cache", "--data.calib.seed", "7")


@case("calibrate.run_dir_read_only", "calibrate", "a read-only run folder (as a non-root user)", hint="run_dir")
def _(ctx):
    ctx.run_dir.mkdir()
    os.chmod(ctx.run_dir, 0o555)
    ctx.arm()
    with as_nobody():
        return ctx.calibrate()


@case("calibrate.run_dir_parent_read_only", "calibrate", "a run folder inside a read-only folder (non-root user)",
      hint="run_dir")
def _(ctx):
    (ctx.dir / "ro").mkdir()
    os.chmod(ctx.dir / "ro", 0o555)
    ctx.arm(ctx.dir / "ro", ctx.w.cache)
    with as_nobody():
        return ctx.calibrate(run_dir=ctx.dir / "ro" / "run")


@case("calibrate.cache_dir_read_only", "calibrate", "a read-only calibration-set cache folder (non-root user, set "
      "not cached yet)", hint="not writable")
def _(ctx):
    (ctx.dir / "cache").mkdir()
    os.chmod(ctx.dir / "cache", 0o555)
    ctx.arm(ctx.run_dir, ctx.dir / "cache")
    with as_nobody():
        return ctx.calibrate("--data.cache_dir", ctx.dir / "cache", "--data.calib.seed", "7")


@case("calibrate.cache_read_only_cached", "calibrate", "a read-only cache folder that already holds the set "
      "(non-root user; only read)", expect="accept")
def _(ctx):
    cache = ctx.dir / "sets"
    shutil.copytree(ctx.w.cache, cache)
    os.chmod(cache, 0o555)
    (ctx.dir / "rw").mkdir()
    os.chmod(ctx.dir / "rw", 0o777)
    ctx.run_dir = ctx.dir / "rw" / "run"
    with as_nobody():
        return ctx.calibrate("--data.cache_dir", cache, arm=False)


CASES[-1].check = same_as_baseline


# ---------------------------------------------------------------- calibrate: an existing run folder
@case("calibrate.rerun_finished", "calibrate", "rerun a finished run (same command)", expect="accept")
def _(ctx):
    ctx.w.copy_run(ctx.run_dir)
    ctx.prev = summary(ctx.run_dir)
    return ctx.calibrate(arm=False)


def _check_rerun(ctx, res):
    ok, note = same_as_baseline(ctx, res)
    if not ok:
        return ok, note
    now, prev = summary(ctx.run_dir), ctx.prev
    errors_kept = [(u["error_before"], u["error_after"]) for u in now["units"]] == \
                  [(u["error_before"], u["error_after"]) for u in prev["units"]]
    seconds = now["calibration_seconds"] >= prev["calibration_seconds"]
    ok = errors_kept and seconds
    return ok, (f"export bit-identical; unit error figures kept: {errors_kept}; calibration_seconds "
                f"{prev['calibration_seconds']:.2f} -> {now['calibration_seconds']:.2f}")


CASES[-1].check = _check_rerun


@case("calibrate.run_dir_other_config", "calibrate", "a finished run folder reused with another config",
      hint="different config")
def _(ctx):
    ctx.w.copy_run(ctx.run_dir)
    return ctx.calibrate("--quant.w_bits", "8")


@case("calibrate.run_json_corrupt", "calibrate", "a corrupt run.json in a run folder with finished units",
      hint="run.json")
def _(ctx):
    ctx.w.copy_run(ctx.run_dir)
    (ctx.run_dir / "run.json").write_text("{not json")
    return ctx.calibrate()


def _advice_keeps_units(ctx, res):
    return ("delete the run folder" not in res.last_line.lower(), "advice does not throw away the finished units"
            if "delete the run folder" not in res.last_line.lower() else "advice: delete the run folder")


@case("calibrate.locked_run_dir", "calibrate", "a second writer on a run folder another holder has locked",
      hint="in use by")
def _(ctx):
    from gaq.calib.checkpoints import RunLock

    ctx.w.copy_run(ctx.run_dir)
    ctx.arm()
    with RunLock(ctx.run_dir):
        return ctx.calibrate()


for _kind, _data in (("garbage", b"\x00garbage, not a checkpoint" * 10), ("truncated", None), ("empty", b"")):
    def _make(kind=_kind, data=_data):
        def run(ctx):
            run_dir, ckpt = ctx.w.interrupted_run(ctx.run_dir)
            raw = ckpt.read_bytes()
            ckpt.write_bytes(raw[: len(raw) // 2] if data is None else data)
            return ctx.calibrate(arm=False)
        return run
    CASES.append(Case(f"calibrate.last_ckpt_{_kind}", "calibrate",
                      f"resume with a {_kind} last.ckpt in the unit in progress", _make(), "accept",
                      check=lambda ctx, res: _check_discarded(ctx, res)))


def _check_discarded(ctx, res):
    ok, note = same_as_baseline(ctx, res)
    warned = "last.ckpt" in (res.stdout + res.stderr)
    unit = next(u for u in summary(ctx.run_dir)["units"] if u["name"] == UNITS[-1]) if ok else {}
    ok = ok and warned and unit.get("resumed_from") == "scratch"
    return ok, f"{note}; warned: {warned}; unit restarted: {unit.get('resumed_from')}"


@case("calibrate.last_ckpt_intact", "calibrate", "resume from an intact last.ckpt (control)", expect="accept",
      check=same_as_baseline)
def _(ctx):
    ctx.w.interrupted_run(ctx.run_dir)
    return ctx.calibrate(arm=False)


def _truncate_unit(ctx) -> Path:
    run = ctx.w.copy_run(ctx.run_dir)
    shutil.rmtree(run / "quantized")
    (run / "summary.json").unlink()
    [unit] = (run / "units").glob(f"{ctx.w.unit_index(UNITS[0])}-*.safetensors")
    raw = unit.read_bytes()
    unit.write_bytes(raw[: len(raw) // 2])
    return unit


@case("calibrate.unit_ckpt_truncated", "calibrate", "resume with a truncated unit checkpoint (a finished unit)",
      hint="delete it")
def _(ctx):
    _truncate_unit(ctx)
    return ctx.calibrate()


@case("calibrate.unit_ckpt_truncated_advice", "calibrate", "the advice for a truncated unit checkpoint: delete it "
      "and rerun", expect="accept", check=same_as_baseline)
def _(ctx):
    unit = _truncate_unit(ctx)
    cli("calibrate", "--config", ctx.w.cfg, "--run_dir", ctx.run_dir)
    unit.unlink()
    return ctx.calibrate(arm=False)


@case("calibrate.calib_set_nan", "calibrate", "a cached calibration set whose x_t is half NaN (metadata intact)",
      hint="NaN")
def _(ctx):
    import torch

    from gaq.data.calibset import CalibrationSet

    cache = ctx.dir / "sets"
    shutil.copytree(ctx.w.cache, cache)
    [path] = cache.glob("calib-*.safetensors")
    cs = CalibrationSet.load(path)
    cs.x[::2] = float("nan")
    cs.meta.pop("format_version", None)
    cs.save(path)
    torch.manual_seed(0)
    ctx.arm(ctx.run_dir, cache)
    return ctx.calibrate("--data.cache_dir", cache)


@case("calibrate.calib_set_nan_advice", "calibrate", "the advice for a cached set with NaN: delete it and rerun",
      expect="accept")
def _(ctx):
    cache = ctx.dir / "sets"
    CASES_BY_ID["calibrate.calib_set_nan"].run(ctx)
    [path] = cache.glob("calib-*.safetensors")
    path.unlink()
    ctx.before = ctx.watch = None
    return ctx.calibrate("--data.cache_dir", cache, arm=False)


CASES[-1].check = same_as_baseline


def _tamper_meta(ctx) -> Path:
    from gaq.data.calibset import CalibrationSet

    cache = ctx.dir / "sets"
    shutil.copytree(ctx.w.cache, cache)
    [path] = cache.glob("calib-*.safetensors")
    cs = CalibrationSet.load(path)
    cs.meta["config"] = {**cs.meta["config"], "seed": 99}
    cs.meta.pop("format_version", None)
    cs.save(path)
    return cache


@case("calibrate.calib_set_meta_mismatch", "calibrate", "a cached calibration set whose metadata does not match "
      "(regenerated with a warning)", expect="accept")
def _(ctx):
    cache = _tamper_meta(ctx)
    return ctx.calibrate("--data.cache_dir", cache, arm=False)


def _check_regenerated(ctx, res, what="calibrate"):
    ok, note = (same_as_baseline(ctx, res) if what == "calibrate" else
                (res.code == 0, f"exit {res.code}"))
    warned = "regenerated" in (res.stdout + res.stderr)
    from gaq.data.calibset import CalibrationSet
    [path] = (ctx.dir / "sets").glob("calib-*.safetensors")
    fresh = CalibrationSet.load(path).meta["config"]["seed"] == 0
    return ok and warned and fresh, f"{note}; warned: {warned}; file regenerated: {fresh}"


CASES[-1].check = _check_regenerated


@case("calibrate.calib_set_truncated", "calibrate", "a truncated cached calibration set (regenerated with a warning)",
      expect="accept")
def _(ctx):
    cache = ctx.dir / "sets"
    shutil.copytree(ctx.w.cache, cache)
    [path] = cache.glob("calib-*.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    return ctx.calibrate("--data.cache_dir", cache, arm=False)


CASES[-1].check = lambda ctx, res: _check_regenerated(ctx, res)


@case("calibrate.print_config", "calibrate", "--print_config (writes nothing)", expect="accept")
def _(ctx):
    ctx.arm()
    return ctx.calibrate("--print_config")


CASES[-1].check = lambda ctx, res: (res.code == 0 and "w_bits: 4" in res.stdout and compare(ctx.before, snapshot(
    ctx.watch)) == "yes", f"exit {res.code}; nothing written: {compare(ctx.before, snapshot(ctx.watch))}")


@case("calibrate.help", "calibrate", "--help: gaq's options before the Trainer's", expect="accept")
def _(ctx):
    return ctx.cli("calibrate", "--help", arm=False)


def _check_help(ctx, res):
    text = res.stdout
    try:
        ok = res.code == 0 and text.index("--model.recon.iters") < text.index("--trainer.accelerator", text.index(
            "options:"))
    except ValueError:
        ok = False
    return ok, f"{len(text.splitlines())} lines; gaq's options first: {ok}"


CASES[-1].check = _check_help


# ---------------------------------------------------------------- calib-data
simple("calib-data.steps_0", "0 sampling steps", "--data.calib.steps", "0", hint="steps", area="calib-data")
simple("calib-data.source_missing", "a model folder that does not exist", "--data.source", "/no/such/model",
       hint="/no/such/model", area="calib-data")
simple("calib-data.w_bits_1", "a bad quantization setting (unused by calib-data)", "--quant.w_bits", "1",
       hint="w_bits", area="calib-data")


@case("calib-data.data_device_cuda", "calib-data", "data.device cuda on a CPU machine", hint="cuda")
def _(ctx):
    ctx.arm(ctx.dir / "sets")
    return ctx.cli("calib-data", "--config", ctx.w.cfg, "--data.device", "cuda", "--data.cache_dir", ctx.dir / "sets")


@case("calib-data.cache_dir_is_file", "calib-data", "data.cache_dir names a file", hint="cache")
def _(ctx):
    (ctx.dir / "cache").write_text("x\n")
    ctx.arm(ctx.dir / "cache")
    return ctx.cli("calib-data", "--config", ctx.w.cfg, "--data.cache_dir", ctx.dir / "cache")


@case("calib-data.cache_dir_read_only", "calib-data", "a read-only cache folder (non-root user)", hint="writable")
def _(ctx):
    (ctx.dir / "cache").mkdir()
    os.chmod(ctx.dir / "cache", 0o555)
    ctx.arm(ctx.dir / "cache")
    with as_nobody():
        return ctx.cli("calib-data", "--config", ctx.w.cfg, "--data.cache_dir", ctx.dir / "cache")


@case("calib-data.nan_weights", "calib-data", "a model with NaN weights (nothing cached)", hint="NaN")
def _(ctx):
    ctx.arm(ctx.dir / "sets")
    return ctx.cli("calib-data", "--config", ctx.w.cfg, "--data.source", ctx.w.nan_model,
                   "--data.cache_dir", ctx.dir / "sets")


@case("calib-data.meta_mismatch", "calib-data", "the advice for a mismatched cached set: rerun gaq calib-data",
      expect="accept")
def _(ctx):
    cache = _tamper_meta(ctx)
    return ctx.cli("calib-data", "--config", ctx.w.cfg, "--data.cache_dir", cache)


CASES[-1].check = lambda ctx, res: _check_regenerated(ctx, res, what="calib-data")


@case("calib-data.reuse", "calib-data", "the cached set (control: reused, path printed)", expect="accept")
def _(ctx):
    ctx.arm(ctx.w.cache)
    return ctx.cli("calib-data", "--config", ctx.w.cfg)


CASES[-1].check = lambda ctx, res: (res.code == 0 and res.stdout.strip().splitlines()[-1] == str(ctx.w.calib_file())
                                    and compare(ctx.before, snapshot(ctx.watch)) == "yes",
                                    f"exit {res.code}; cache untouched: {compare(ctx.before, snapshot(ctx.watch))}")


# ---------------------------------------------------------------- evaluate
def ev(id: str, what: str, *extra: str, hint: str | None = None, run: bool = False, new_process: bool = False) -> None:
    def fn(ctx):
        args = ["evaluate", "--config", ctx.w.eval_cfg, "--out_dir", ctx.dir / "out"]
        if run:
            ctx.w.copy_run(ctx.run_dir)
            args += ["--run", ctx.run_dir]
        ctx.arm(ctx.run_dir, ctx.dir / "out")
        named = {"OTHER": ctx.w.other_model, "NAN": ctx.w.nan_model}
        return ctx.cli(*args, *[named.get(a, a) for a in extra], new_process=new_process)
    CASES.append(Case(id, "evaluate", what, fn, "error", hint))


ev("evaluate.run_missing", "a run folder that does not exist", "--run", "/no/such/run", hint="/no/such/run")
ev("evaluate.num_samples_0", "0 samples", "--num_samples", "0", hint="num_samples")
ev("evaluate.num_samples_neg", "-3 samples", "--num_samples", "-3", hint="num_samples")
ev("evaluate.num_samples_15", "a sample count that is not a multiple of the classes", "--num_samples", "15",
   hint="multiple")
ev("evaluate.batch_size_0", "batch size 0", "--batch_size", "0", hint="batch_size")
ev("evaluate.sampler_steps_0", "0 sampler steps", "--sampler.steps", "0", hint="steps")
ev("evaluate.features_missing", "a classifier folder that does not exist", "--features", "/no/such/classifier",
   hint="/no/such/classifier")
ev("evaluate.source_missing", "a model folder that does not exist", "--source", "/no/such/model",
   hint="/no/such/model")
ev("evaluate.trainer_gpu", "trainer.accelerator gpu on a CPU machine", "--trainer.accelerator", "gpu",
   hint="accelerator")
ev("evaluate.trainer_devices_0", "trainer.devices 0", "--trainer.devices", "0", hint="devices")
ev("evaluate.trainer_strategy_bad", "an unknown strategy", "--trainer.strategy", "nope", hint="strategy")
ev("evaluate.unknown_key", "an option that does not exist", "--no_such_key", "1", hint="no_such_key")
ev("evaluate.reference_kind_bad", "an unknown reference kind", "--reference.kind", "nope", hint="kind")
ev("evaluate.prompts_for_class_model", "a prompt file for a class-conditional model", "--prompts",
   "/no/such/prompts.txt", hint="prompts")
ev("evaluate.other_source_for_run", "a run evaluated on another base model (fingerprint differs)", "--source",
   "OTHER", hint="fingerprint", run=True)
ev("evaluate.limit_predict_batches", "trainer.limit_predict_batches 1 (would drop samples)",
   "--trainer.limit_predict_batches", "1", hint="limit_predict_batches")
ev("evaluate.nan_source", "an FP model with NaN weights (in a new process: it can crash)", "--source", "NAN",
   hint="NaN", new_process=True)


@case("evaluate.run_without_export", "evaluate", "a run folder whose calibration did not finish (no quantized/)",
      hint="quantized")
def _(ctx):
    ctx.w.interrupted_run(ctx.run_dir)
    ctx.arm(ctx.run_dir)
    return ctx.cli("evaluate", "--config", ctx.w.eval_cfg, "--run", ctx.run_dir)


@case("evaluate.run_export_truncated", "evaluate", "a run whose quantized.safetensors is truncated", hint="quantized")
def _(ctx):
    run = ctx.w.copy_run(ctx.run_dir)
    f = run / "quantized" / "quantized.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    ctx.arm(ctx.run_dir)
    return ctx.cli("evaluate", "--config", ctx.w.eval_cfg, "--run", ctx.run_dir)


@case("evaluate.run_quant_config_corrupt", "evaluate", "a run whose quant_config.json is corrupt",
      hint="quant_config.json")
def _(ctx):
    run = ctx.w.copy_run(ctx.run_dir)
    (run / "quantized" / "quant_config.json").write_text("{oops")
    ctx.arm(ctx.run_dir)
    return ctx.cli("evaluate", "--config", ctx.w.eval_cfg, "--run", ctx.run_dir)


@case("evaluate.out_dir_is_file", "evaluate", "--out_dir names a file", hint="is a file")
def _(ctx):
    (ctx.dir / "out").write_text("x\n")
    ctx.arm(ctx.dir / "out", ctx.w.work / "eval_cache")
    return ctx.cli("evaluate", "--config", ctx.w.eval_cfg, "--out_dir", ctx.dir / "out")


@case("evaluate.config_empty", "evaluate", "an empty YAML config", hint="empty")
def _(ctx):
    (ctx.dir / "empty.yaml").write_text("")
    return ctx.cli("evaluate", "--config", ctx.dir / "empty.yaml")


@case("evaluate.fp_tiny", "evaluate", "the FP model at tiny settings (control)", expect="accept")
def _(ctx):
    return ctx.cli("evaluate", "--config", ctx.w.eval_cfg, "--out_dir", ctx.dir / "out", "--timestep_error.enabled",
                   "false", arm=False)


CASES[-1].check = lambda ctx, res: (res.code == 0 and (ctx.dir / "out" / "metrics.json").is_file(),
                                    f"exit {res.code}; metrics.json written")


@case("evaluate.run_tiny", "evaluate", "the finished run at tiny settings (control): the summary's figure copied",
      expect="accept")
def _(ctx):
    ctx.w.copy_run(ctx.run_dir)
    return ctx.cli("evaluate", "--config", ctx.w.eval_cfg, "--run", ctx.run_dir, arm=False)


def _check_eval_run(ctx, res):
    if res.code != 0:
        return False, f"exit {res.code}"
    m = json.loads((ctx.run_dir / "eval" / "metrics.json").read_text())
    secs = summary(ctx.run_dir)["calibration_seconds"]
    found = [v for v in _walk(m) if isinstance(v, float) and abs(v - secs) < 1e-9]
    return bool(found), f"metrics.json carries calibration_seconds {secs:.2f}: {bool(found)}"


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


CASES[-1].check = _check_eval_run


# ---------------------------------------------------------------- the gaq command itself
@case("gaq.no_args", "gaq", "gaq with no subcommand (usage, exit 2)", expect="accept")
def _(ctx):
    return ctx.cli(arm=False)


CASES[-1].check = lambda ctx, res: (res.code == 2 and "subcommands:" in res.stdout, f"exit {res.code}; usage printed")


@case("gaq.unknown_subcommand", "gaq", "an unknown subcommand", hint="calibrate")
def _(ctx):
    return ctx.cli("calibrat", "--config", ctx.w.cfg, arm=False)


# ---------------------------------------------------------------- the Python API
def _cfg(**kw):
    import gaq
    from gaq.calib.recon import ReconConfig
    from gaq.data.datamodule import SplitConfig
    from gaq.quant import QuantConfig

    quant = kw.pop("quant", None) or QuantConfig(w_bits=4, a_bits=8)
    return gaq.CalibrationConfig(method=kw.pop("method", "rtn"), quant=quant,
                                 split=SplitConfig(val_fraction=0.25, num_groups=2),
                                 recon=ReconConfig(iters=4, batch_size=8, ckpt_every=0, cache_batch=32), **kw)


CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def api_case(id: str, what: str, text: str, make: Callable[[Ctx], Callable[[], Any]], hint: str | None = None,
             expect: str = "error", check=None) -> None:
    def fn(ctx):
        call = make(ctx)
        return ctx.api(text, call)
    CASES.append(Case(id, "api", what, fn, expect, hint, check))


def _w4a32():
    from gaq.quant import QuantConfig
    return QuantConfig(w_bits=4, a_bits=32)


def _quantize(model, **kw):
    import gaq
    from gaq.quant import QuantConfig
    return lambda: gaq.quantize(model, kw.pop("config", None) or QuantConfig(w_bits=4, a_bits=8), **kw)


api_case("api.quantize_non_module", "gaq.quantize on a non-module", 'gaq.quantize("not a model", QuantConfig())',
         lambda ctx: _quantize("not a model"), hint="module")
api_case("api.quantize_nan", "gaq.quantize on NaN weights", "gaq.quantize(unet_with_nan, QuantConfig())",
         lambda ctx: _quantize(nan_unet()), hint="NaN")
api_case("api.quantize_float_timesteps", "gaq.quantize with float timesteps",
         "gaq.quantize(unet, QuantConfig(), timesteps=torch.tensor([0.5, 1.5]))",
         lambda ctx: _quantize(tiny_unet(), timesteps=__import__("torch").tensor([0.5, 1.5])), hint="timesteps")
api_case("api.quantize_2d_timesteps", "gaq.quantize with a 2-D timestep tensor",
         "gaq.quantize(unet, QuantConfig(), timesteps=torch.zeros(2, 2, dtype=torch.long))",
         lambda ctx: _quantize(tiny_unet(), timesteps=__import__("torch").zeros(2, 2, dtype=__import__("torch").long)),
         hint="timesteps")
api_case("api.quantize_w_bits_1", "gaq.quantize with w_bits 1", "gaq.quantize(unet, QuantConfig(w_bits=1))",
         lambda ctx: _quantize(tiny_unet(), config=__import__("gaq.quant", fromlist=["QuantConfig"]).QuantConfig(
             w_bits=1)), hint="w_bits")
api_case("api.quantize_a_bits_3", "gaq.quantize with a_bits 3", "gaq.quantize(unet, QuantConfig(a_bits=3))",
         lambda ctx: _quantize(tiny_unet(), config=__import__("gaq.quant", fromlist=["QuantConfig"]).QuantConfig(
             a_bits=3)), hint="a_bits")
api_case("api.quantize_dict_config", "gaq.quantize with a dict instead of a QuantConfig",
         'gaq.quantize(unet, {"w_bits": 4})', lambda ctx: _quantize(tiny_unet(), config={"w_bits": 4}),
         hint="QuantConfig")
api_case("api.quantize_twice", "gaq.quantize on an already quantized model",
         "gaq.quantize(gaq.quantize(unet, cfg), cfg)",
         lambda ctx: _quantize(_quantize(tiny_unet(), config=_w4a32())(), config=_w4a32()), hint="already quantized")


def _save(ctx, target, model=None):
    import gaq
    from gaq.quant import QuantConfig
    model = model if model is not None else gaq.quantize(tiny_unet(), QuantConfig(w_bits=4, a_bits=32))
    return lambda: gaq.save_quantized(model, target)


def _make_file(ctx):
    (ctx.dir / "file").write_text("x\n")
    ctx.arm(ctx.dir / "file")
    return _save(ctx, ctx.dir / "file")


api_case("api.save_over_file", "gaq.save_quantized onto an existing file", 'gaq.save_quantized(qmodel, "file")',
         _make_file, hint="is a file")


def _make_ro(ctx):
    (ctx.dir / "ro").mkdir()
    os.chmod(ctx.dir / "ro", 0o555)
    ctx.arm(ctx.dir / "ro")
    inner = _save(ctx, ctx.dir / "ro" / "export")

    def call():
        with as_nobody():
            return inner()
    return call


api_case("api.save_read_only", "gaq.save_quantized into a read-only folder (non-root user)",
         'gaq.save_quantized(qmodel, "read_only/export")', _make_ro, hint="writable")
api_case("api.save_fp_model", "gaq.save_quantized on an FP (not quantized) model", 'gaq.save_quantized(unet, "out")',
         lambda ctx: _save(ctx, ctx.dir / "out", model=tiny_unet()), hint="quantiz")


def _make_overwrite(ctx):
    shutil.copytree(ctx.w.export, ctx.dir / "export")
    return _save(ctx, ctx.dir / "export")


def _check_overwrite(ctx, res):
    import gaq
    if res.exc is not None:
        return False, f"{type(res.exc).__name__}: {res.exc}"
    m = gaq.from_pretrained(ctx.dir / "export")
    return m is not None, "overwritten, loads back"


api_case("api.save_over_export", "gaq.save_quantized over an existing export folder (overwrite)",
         'gaq.save_quantized(qmodel, "existing_export")', _make_overwrite, expect="accept", check=_check_overwrite)


def _pretrained(ctx, damage=None):
    import gaq
    folder = ctx.dir / "export"
    shutil.copytree(ctx.w.export, folder)
    if damage:
        damage(folder)
    ctx.arm(folder)
    return lambda: gaq.from_pretrained(folder)


api_case("api.from_pretrained_missing", "gaq.from_pretrained on a folder that does not exist",
         'gaq.from_pretrained("/no/such/export")', lambda ctx: (lambda: __import__("gaq").from_pretrained(
             "/no/such/export")), hint="/no/such/export")
api_case("api.from_pretrained_fp_folder", "gaq.from_pretrained on an FP model folder", 'gaq.from_pretrained("model")',
         lambda ctx: (lambda: __import__("gaq").from_pretrained(ctx.w.model)), hint="quant_config.json")
api_case("api.from_pretrained_truncated", "gaq.from_pretrained with a truncated quantized.safetensors",
         'gaq.from_pretrained("export")  # quantized.safetensors cut to 1 kB',
         lambda ctx: _pretrained(ctx, lambda f: (f / "quantized.safetensors").write_bytes(
             (f / "quantized.safetensors").read_bytes()[:1000])), hint="quantized.safetensors")
api_case("api.from_pretrained_config_corrupt", "gaq.from_pretrained with a corrupt quant_config.json",
         'gaq.from_pretrained("export")  # quant_config.json is "{oops"',
         lambda ctx: _pretrained(ctx, lambda f: (f / "quant_config.json").write_text("{oops")),
         hint="quant_config.json")
api_case("api.from_pretrained_no_fp_parts", "gaq.from_pretrained without fp_parts.safetensors",
         'gaq.from_pretrained("export")  # fp_parts.safetensors deleted',
         lambda ctx: _pretrained(ctx, lambda f: (f / "fp_parts.safetensors").unlink()), hint="load_quantized")


def _calibrate(ctx, model=None, config=None, data=None, **kw):
    import gaq
    model = tiny_unet() if model is None else model
    config = _cfg() if config is None else config
    data = user_batches() if data is None else data
    kw.setdefault("run_dir", ctx.run_dir)
    kw.setdefault("trainer", CPU)
    return lambda: gaq.calibrate(model, config, data, **kw)


api_case("api.calibrate_ok", "gaq.calibrate on user batches (control)", "gaq.calibrate(unet, rtn_config, batches, "
         "run_dir=run, trainer=CPU)", lambda ctx: _calibrate(ctx), expect="accept",
         check=lambda ctx, res: (res.exc is None and hasattr(res.value, "gaq_summary") and
                                 (ctx.run_dir / "quantized").is_dir(),
                                 "returned the quantized model" if res.exc is None else repr(res.exc)))
api_case("api.calibrate_non_module", "gaq.calibrate on a non-module", "gaq.calibrate(42, config, batches)",
         lambda ctx: _calibrate(ctx, model=42), hint="model")
api_case("api.calibrate_missing_folder", "gaq.calibrate on a model folder that does not exist",
         'gaq.calibrate("/no/such/model", config, batches)', lambda ctx: _calibrate(ctx, model="/no/such/model"),
         hint="/no/such/model")
api_case("api.calibrate_dict_config", "gaq.calibrate with a dict config", 'gaq.calibrate(unet, {"method": "rtn"}, '
         'batches)', lambda ctx: _calibrate(ctx, config={"method": "rtn"}), hint="CalibrationConfig")
api_case("api.config_bad_method", "CalibrationConfig with an unknown method", 'gaq.CalibrationConfig(method="brecq")',
         lambda ctx: (lambda: __import__("gaq").CalibrationConfig(method="brecq")), hint="method")
api_case("api.recon_iters_neg", "ReconConfig(iters=-1)", "ReconConfig(iters=-1)",
         lambda ctx: (lambda: __import__("gaq.calib.recon", fromlist=["ReconConfig"]).ReconConfig(iters=-1)),
         hint="iters")
api_case("api.calibrate_tensor_data", "gaq.calibrate with a bare tensor as data", "gaq.calibrate(unet, config, "
         "torch.zeros(3))", lambda ctx: _calibrate(ctx, data=__import__("torch").zeros(3)), hint="data")
api_case("api.calibrate_empty_data", "gaq.calibrate with no batches", "gaq.calibrate(unet, config, [])",
         lambda ctx: _calibrate(ctx, data=[]), hint="empty")
api_case("api.calibrate_float_t", "batches with non-integer timesteps", "gaq.calibrate(unet, config, batches_t_0.5)",
         lambda ctx: _calibrate(ctx, data=user_batches(t_dtype=__import__("torch").float32)), hint="integer")
api_case("api.calibrate_nan_batches", "batches whose x_t is half NaN", "gaq.calibrate(unet, config, batches_nan)",
         lambda ctx: _calibrate(ctx, data=user_batches(nan=True)), hint="NaN")
api_case("api.calibrate_wrong_channels", "batches of 3-channel images for a 1-channel model",
         "gaq.calibrate(unet, config, batches_3ch)", lambda ctx: _calibrate(ctx, data=user_batches(channels=3)),
         hint="channel")
api_case("api.calibrate_t_out_of_range", "timesteps beyond the model's 1000", "gaq.calibrate(unet, config, "
         "batches_t_5000)  # model: a folder with its 1000-step schedule",
         lambda ctx: _calibrate(ctx, model=str(ctx.w.model), data=user_batches(timesteps=(5000, 3000))),
         hint="timestep")
api_case("api.calibrate_negative_t", "negative timesteps", "gaq.calibrate(unet, config, batches_t_-1)",
         lambda ctx: _calibrate(ctx, data=user_batches(timesteps=(-1, 500))), hint="timestep")
api_case("api.calibrate_trainer_not_mapping", "trainer given as a string", 'gaq.calibrate(..., trainer="cpu")',
         lambda ctx: _calibrate(ctx, trainer="cpu"), hint="trainer")
api_case("api.calibrate_sample_device_cuda", "sample_device cuda on a CPU machine (set to generate)",
         'gaq.calibrate(unet, config, CalibSetConfig(...), scheduler=sched, sample_device="cuda")',
         lambda ctx: _calibrate(ctx, data=__import__("gaq.data.calibset", fromlist=["CalibSetConfig"]).CalibSetConfig(
             steps=4, interval=2, samples_per_step=8, batch_size=8), scheduler=__import__(
             "diffusers").DDPMScheduler(num_train_timesteps=1000), cache_dir=ctx.dir / "sets", sample_device="cuda"),
         hint="cuda")
api_case("api.calibrate_no_labels", "batches without the class labels a class-conditional model needs",
         "gaq.calibrate(unet, config, [(x_t, t), ...])", lambda ctx: _calibrate(ctx, data=user_batches(labels=False)),
         hint="class_labels")
api_case("api.calibrate_bad_batch", "a batch that is a bare tensor", "gaq.calibrate(unet, config, [torch.zeros(8, 1, "
         "16, 16)])", lambda ctx: _calibrate(ctx, data=[__import__("torch").zeros(8, 1, 16, 16)]), hint="batch")
api_case("api.calibrate_nan_model", "gaq.calibrate on a model with NaN weights", "gaq.calibrate(unet_with_nan, "
         "config, batches)", lambda ctx: _calibrate(ctx, model=nan_unet()), hint="NaN")
api_case("api.calibrate_no_scheduler", "a CalibSetConfig for a bare module without scheduler=",
         "gaq.calibrate(unet, config, CalibSetConfig())", lambda ctx: _calibrate(
             ctx, data=__import__("gaq.data.calibset", fromlist=["CalibSetConfig"]).CalibSetConfig()), hint="scheduler")
api_case("api.calibrate_bad_scheduler", "a scheduler that is not a diffusers scheduler",
         'gaq.calibrate(unet, config, batches, scheduler="ddim")', lambda ctx: _calibrate(ctx, scheduler="ddim"),
         hint="scheduler")
api_case("api.calibrate_trainer_gpu", "trainer accelerator gpu on a CPU machine", 'gaq.calibrate(..., trainer={'
         '"accelerator": "gpu"})', lambda ctx: _calibrate(ctx, trainer={"accelerator": "gpu", "devices": 1}),
         hint="accelerator")
api_case("api.calibrate_trainer_max_steps", "trainer max_steps (the engine sets its own loop)",
         'gaq.calibrate(..., trainer={"accelerator": "cpu", "max_steps": 1})',
         lambda ctx: _calibrate(ctx, trainer={**CPU, "max_steps": 1}), hint="max_steps")
api_case("api.calibrate_trainer_devices_0", "trainer devices 0", 'gaq.calibrate(..., trainer={"accelerator": "cpu", '
         '"devices": 0})', lambda ctx: _calibrate(ctx, trainer={**CPU, "devices": 0}), hint="devices")
api_case("api.calibrate_trainer_typo", "a misspelt Trainer argument", 'gaq.calibrate(..., trainer={"accelerater": '
         '"cpu"})', lambda ctx: _calibrate(ctx, trainer={"accelerater": "cpu"}), hint="accelerater")


def _make_run_file(ctx):
    ctx.run_dir.write_text("x\n")
    ctx.arm()
    return _calibrate(ctx)


api_case("api.calibrate_run_dir_file", "run_dir names a file", 'gaq.calibrate(..., run_dir="a_file")', _make_run_file,
         hint="is a file")


def _make_cache_file(ctx):
    from diffusers import DDPMScheduler
    from gaq.data.calibset import CalibSetConfig
    (ctx.dir / "cache").write_text("x\n")
    ctx.arm(ctx.run_dir, ctx.dir / "cache")
    return _calibrate(ctx, data=CalibSetConfig(steps=4, interval=2, samples_per_step=8, batch_size=8),
                      scheduler=DDPMScheduler(num_train_timesteps=1000), cache_dir=ctx.dir / "cache")


api_case("api.calibrate_cache_dir_file", "cache_dir names a file", 'gaq.calibrate(unet, config, CalibSetConfig(...), '
         'scheduler=sched, cache_dir="a_file")', _make_cache_file, hint="is a file")


def _make_locked(ctx):
    from gaq.calib.checkpoints import RunLock
    ctx.run_dir.mkdir()
    (ctx.run_dir / "keep.txt").write_text("x\n")
    ctx.arm()
    inner = _calibrate(ctx)

    def call():
        with RunLock(ctx.run_dir):
            return inner()
    return call


api_case("api.calibrate_locked", "a run folder another holder has locked", "gaq.calibrate(..., run_dir=locked_run)",
         _make_locked, hint="in use by")


def _make_nan_set(ctx):
    from gaq.calib.api import calibration_set_from_batches
    cs = calibration_set_from_batches(user_batches())
    cs.x[::3] = float("nan")
    return _calibrate(ctx, data=cs)


api_case("api.calibrate_nan_calibration_set", "a CalibrationSet object whose x_t holds NaN",
         "gaq.calibrate(unet, config, calibration_set_with_nan)", _make_nan_set, hint="NaN")


# ============================================================================================ judging

def judge(c: Case, ctx: Ctx, res: Result) -> tuple[str, str]:
    """(verdict, note)."""
    unchanged = compare(ctx.before, snapshot(ctx.watch)) if ctx.watch is not None else "n/a"
    ctx.unchanged = unchanged
    is_api = c.area == "api"
    refused = (res.exc is not None) if is_api else (res.code not in (0, None))
    notes = list(ctx.notes)
    if isinstance(res.code, int) and res.code < 0:
        return "WRONG outcome", "; ".join(notes + [f"the process crashed: {signal.Signals(-res.code).name}"])
    if c.expect == "error":
        if (is_api and res.exc is not None and type(res.exc).__name__ != "GaqError") or (not is_api and res.traceback):
            return "traceback", "; ".join(notes)
        if not refused:
            return "WRONG outcome", "; ".join(notes + ["accepted a bad input"])
        if unchanged.startswith("no"):
            return "WRONG outcome", "; ".join(notes + ["files written before the failure changed"])
        msg = str(res.exc) if is_api else res.last_line
        if c.hint and c.hint.lower() not in msg.lower():
            notes.append(f"the message does not name {c.hint!r}")
        if re.search(r'Parser key "[^"]+":\s*(\(|$)', msg):
            notes.append("names the key but not what is wrong with the value or what is allowed")
        if c.id == "calibrate.run_json_corrupt":
            notes.append(_advice_keeps_units(ctx, res)[1])
        if is_api:
            return ("one-line error" if "\n" not in str(res.exc) else "multi-line error"), "; ".join(notes)
        lines = res.error_lines
        if len(lines) == 1 and lines[0].startswith("gaq: error:") and res.code == 2:
            extra = len(res.stderr_lines) - 1
            if extra:
                notes.append(f"{extra} warning line(s) before it")
            return "one-line error", "; ".join(notes)
        return "multi-line error", "; ".join(notes + [f"{len(lines)} error lines"])
    # expect accept
    if (is_api and res.exc is not None and type(res.exc).__name__ != "GaqError") or (not is_api and res.traceback):
        return "traceback", "; ".join(notes)
    ok, note = c.check(ctx, res) if c.check else (not refused, "")
    if note:
        notes.append(note)
    if refused and c.id not in ("gaq.no_args",):
        return "WRONG outcome", "; ".join(notes + ["refused a valid input"])
    return ("accepted (correct)" if ok else "WRONG outcome"), "; ".join(notes)


def run_cases(world: World, only: list[str] | None) -> list[dict]:
    rows = []
    for c in CASES:
        if only and not any(fnmatch.fnmatch(c.id, pat) for pat in only):
            continue
        ctx = Ctx(world, c)
        t0 = time.perf_counter()
        try:
            res = c.run(ctx)
            verdict, note = judge(c, ctx, res)
        except Exception as err:  # the sweep's own set-up failed: say so, do not hide it
            res = Result(code="sweep error", stderr=traceback.format_exc())
            verdict, note = "sweep error", f"{type(err).__name__}: {err}"
            ctx.unchanged = "n/a"
        seconds = time.perf_counter() - t0
        is_api = c.area == "api"
        stdout = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        message = (f"{type(res.exc).__name__}: {str(res.exc).splitlines()[0] if str(res.exc) else ''}"
                   if is_api and res.exc is not None else "(returned)" if is_api else
                   f"(stdout: {stdout[-1] if stdout else ''})" if res.code == 0 and not res.traceback else
                   f"(crashed; last output: {(res.stderr_lines or stdout or [''])[-1].strip()})"
                   if isinstance(res.code, int) and res.code < 0 else res.last_line)
        rows.append({
            "id": c.id, "area": c.area, "what": c.what, "command": c.command, "expect": c.expect,
            "exit": res.code, "message": ctx.short(message), "stderr_lines": len(res.stderr_lines) if not is_api else
            (len(str(res.exc).splitlines()) if res.exc is not None else 0),
            "unchanged": ctx.unchanged, "verdict": verdict, "note": ctx.short(note), "seconds": round(seconds, 2),
            "stderr_tail": ctx.short(res.stderr[-4000:]), "stdout_tail": ctx.short(res.stdout[-1500:]),
        })
        print(f"[{len(rows):3d}] {verdict:<20} {seconds:6.1f}s {c.id}: {rows[-1]['message'][:110]}", file=sys.__stdout__,
              flush=True)
    return rows


# ============================================================================================ kill -9 trials

def kill_trials(world: World, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    trials = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    straight: dict[str, tuple[Path, float]] = {}
    for i in range(n):
        method = "gac" if i % 2 == 1 else "uniform"
        cfg = set_yaml(world.work / f"kill-{method}.yaml", world.calibrate, method=method,
                       units=["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.0.resnets.0",
                              "up_blocks.1.resnets.1"],
                       **{"model.recon.iters": 60, "model.recon.ckpt_every": 5})
        if method not in straight:
            run = world.work / "kill" / f"straight-{method}"
            res = cli("calibrate", "--config", cfg, "--run_dir", run)
            assert res.code == 0, res.stderr[-2000:]
            units = [u for u in summary(run)["units"] if u["reconstructed"]]
            straight[method] = (run, sum(u["seconds"] for u in units[1:]), len(units))
        ref, seconds, n_units = straight[method]
        run = world.work / "kill" / f"trial-{i}"
        command = ["gaq", "calibrate", "--config", str(cfg), "--run_dir", str(run)]
        delay = rng.uniform(0.0, seconds * 1.1)  # the units after the first, and a little of what follows
        row: dict[str, Any] = {"trial": i + 1, "method": method, "command": shlex.join(command).replace(
            str(world.work), "$W"), "planned_delay_s": round(delay, 2)}
        for attempt in range(3):
            shutil.rmtree(run, ignore_errors=True)
            proc = subprocess.Popen([sys.executable, "-m", "gaq.cli", *command[1:]], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not list((run / "units").glob("*.safetensors")):
                time.sleep(0.02)
            t_first = time.time()
            if i == 0 and attempt == 0 and proc.poll() is None:   # a second writer while a real process holds it
                second = cli(*command[1:])
                row["second_writer"] = {"exit": second.code, "message": second.last_line.replace(str(world.work), "$W"),
                                        "one_line": len(second.error_lines) == 1 and second.code == 2,
                                        "names_pid": f"pid {proc.pid}" in second.last_line}
            while time.time() < t_first + delay and proc.poll() is None:
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            delay = delay / 3  # it finished first: kill earlier
            row["planned_delay_s"] = round(delay, 2)
        row["killed_after_s"] = round(time.time() - t_first, 2)
        row["killed"] = proc.returncode == -signal.SIGKILL
        row["units_done_at_kill"] = len(list((run / "units").glob("*.json")))
        row["units_total"] = n_units
        row["last_ckpts_at_kill"] = sorted(p.parent.name for p in (run / "lightning").glob("*/last.ckpt"))
        row["export_at_kill"] = (run / "quantized").is_dir()
        res = cli(*command[1:])
        row["resume_exit"] = res.code
        if res.code == 0:
            kinds = [u["resumed_from"] for u in summary(run)["units"] if u.get("reconstructed")]
            row["resumed_from"] = kinds
            row["bit_identical"] = same_export(ref, run)
        else:
            row["resume_message"] = res.last_line
            row["bit_identical"] = False
        print(f"[kill {i + 1}] {method} after {row['killed_after_s']} s: {row['units_done_at_kill']} unit files, "
              f"resume exit {res.code}, bit-identical {row['bit_identical']}", file=sys.__stdout__, flush=True)
        trials.append(row)
    return trials


# ============================================================================================ report

VERDICTS = ["one-line error", "accepted (correct)", "multi-line error", "traceback", "WRONG outcome", "sweep error"]


def md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, rows: list[dict], trials: list[dict] | None, meta: dict, world: World) -> None:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    lines = ["# Reliability sweep (issue 13)", "",
             f"{len(rows)} bad or edge inputs through `gaq calibrate`, `gaq calib-data`, `gaq evaluate` and the Python "
             "API on a tiny class-conditional UNet (built by the script, CPU)"
             + (f", and {len(trials)} kill -9 / resume trials." if trials else "; kill trials skipped (--quick)."), "",
             "Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items() if n) + ".", "",
             "- *one-line error*: exit 2, no traceback, the only stderr line that is not a warning is `gaq: error: ...`"
             " (API: a one-line `GaqError`);",
             "- *accepted (correct)*: a valid input, or a damaged file gaq repairs itself, and the outcome checked "
             "(note column);",
             "- *traceback* / *multi-line error* / *WRONG outcome*: what the issue asks to remove.",
             "- *unchanged*: sha256 of every file in the watched folders (the case's run folder and the calibration-set "
             "cache, or the files named by the case) before and after the failing call (`.lock` left out); `yes` for "
             "a fresh run folder means nothing was written.",
             "- `$W` is the sweep's work folder: `$W/calibrate.yaml` and `$W/evaluate.yaml` are the tiny configs "
             "at the end of this file, `$W/model` the tiny model, `$W/model_nan` the same with a NaN weight, "
             "`$W/model_other` another seed, `$W/finished_run` a straight run that cases copy; `$C` is the case's "
             "own folder (`$W/cases/<case>`).",
             "- *last stderr line*: for a command that exits 0, its last stdout line instead (the run folder it "
             "prints); the full tails are in the .json.", ""]
    open_cases = [r for r in rows if r["verdict"] not in ("one-line error", "accepted (correct)")]
    if open_cases:
        lines += ["Still open (" + str(len(open_cases)) + "):", ""]
        lines += [f"- `{r['id']}` ({r['verdict']}): {md_cell(r['what'])}: {md_cell(r['message'] or r['note'])}"
                  f"{'; ' + md_cell(r['note']) if r['note'] and r['message'] else ''}" for r in open_cases]
        lines.append("")
    lines += [
             "| # | case | bad input | command / call | exit | stderr lines | last stderr line (the message) | "
             "files unchanged | verdict | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append("| " + " | ".join(md_cell(x) for x in (
            i, r["id"], r["what"], f"`{r['command']}`", r["exit"], r["stderr_lines"], r["message"], r["unchanged"],
            f"**{r['verdict']}**" if r["verdict"] not in ("one-line error", "accepted (correct)") else r["verdict"],
            r["note"])) + " |")
    lines.append("")
    if trials:
        lines += ["## kill -9 and resume", "",
                  "`gaq calibrate` in a subprocess (tiny config, 60 AdaRound iterations on each of 4 units, a "
                  "Lightning checkpoint every 5), SIGKILLed at a random moment after its first unit checkpoint "
                  f"(seed {meta['seed']}: a delay drawn uniformly in [0, 1.1 x the straight run's time for the other "
                  "3 units]), then "
                  "the same command again; the export is compared tensor by tensor with an uninterrupted run of the "
                  "same config.", "",
                  "| trial | method | killed after first unit ckpt (s) | units finished at kill | units with a last.ckpt at kill | "
                  "resume exit | reconstructed units resumed from | export bit-identical |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in trials:
            lines.append("| " + " | ".join(md_cell(x) for x in (
                t["trial"], t["method"], t["killed_after_s"] if t["killed"] else "finished before the kill",
                f"{t['units_done_at_kill']} of {t['units_total']}" + (" (export written)" if t["export_at_kill"] else ""),
                ", ".join(t["last_ckpts_at_kill"]) or "-", t["resume_exit"],
                ", ".join(t.get("resumed_from", [])) or t.get("resume_message", ""),
                "yes" if t["bit_identical"] else "**no**")) + " |")
        sw = next((t["second_writer"] for t in trials if "second_writer" in t), None)
        if sw:
            lines += ["", f"Second writer while trial 1's process held the run folder: exit {sw['exit']}, "
                          f"`{md_cell(sw['message'])}` (one line: {sw['one_line']}; names the holder's pid: "
                          f"{sw['names_pid']})."]
        lines.append("")
    lines += ["## How this was made", "",
              f"- command: `{meta['command']}`",
              f"- machine: {meta['machine']}",
              f"- date: {meta['date']}",
              f"- git commit: {meta['git_commit']}" + (f" (uncommitted changes in the working tree: "
                                                       f"{', '.join(meta['dirty'])})" if meta["dirty"] else ""),
              f"- wall time: {meta['wall_seconds']:.0f} s", "",
              "The tiny calibrate config (`$W/calibrate.yaml`):", "", "```yaml",
              world.cfg.read_text().replace(str(world.work), "$W").rstrip(), "```", "",
              "The tiny evaluate config (`$W/evaluate.yaml`):", "", "```yaml",
              world.eval_cfg.read_text().replace(str(world.work), "$W").rstrip(), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "counts": counts, "cases": rows,
                                                    "kill_trials": trials}, indent=1, default=str))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/reliability.md", help="the table (and .json beside it)")
    p.add_argument("--quick", action="store_true", help="skip the kill -9 trials")
    p.add_argument("--trials", type=int, default=4, help="number of kill -9 / resume trials (uniform, gac, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--only", action="append", help="run only the cases whose id matches (fnmatch; repeatable)")
    p.add_argument("--work", default=None, help="work folder (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    t0 = time.time()
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gaq-reliability-"))
    print(f"work folder: {work}", flush=True)
    try:
        world = World(work)
        rows = run_cases(world, args.only)
        trials = None if args.quick else kill_trials(world, args.trials, args.seed)
        meta = {"command": shlex.join(["python", "bench/reliability.py", *(argv if argv is not None else sys.argv[1:])]),
                "machine": machine(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "git_commit": git("rev-parse", "--short", "HEAD"), "dirty": [ln.split(maxsplit=1)[-1] for ln in git(
                    "status", "--porcelain", "--", "gaq").splitlines() if ln.strip()],
                "wall_seconds": time.time() - t0, "seed": args.seed}
        write_report(Path(args.out), rows, trials, meta, world)
    finally:
        if not args.keep and not args.work:
            for d in work.rglob("*"):
                if d.is_dir():
                    os.chmod(d, 0o755)
            shutil.rmtree(work, ignore_errors=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    print(f"{len(rows)} cases: " + ", ".join(f"{v}: {n}" for v, n in counts.items() if n)
          + (f"; kill trials bit-identical: {sum(t['bit_identical'] for t in trials)}/{len(trials)}" if trials else "")
          + f"; {time.time() - t0:.0f} s; wrote {args.out}", flush=True)
    bad = counts["traceback"] + counts["WRONG outcome"] + counts["sweep error"] + (
        sum(not t["bit_identical"] for t in trials) if trials else 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
