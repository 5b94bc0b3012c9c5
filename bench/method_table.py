"""The method table: calibrate and evaluate every method x bit setting x seed, then tabulate.

    python bench/method_table.py                                   # defaults below, the default model
    python bench/method_table.py --iters 500 --num_samples 2000 --accelerator gpu
    python bench/method_table.py --methods '[rtn, uniform]' --bits '[W4A8]' --seeds '[0]'
    python bench/method_table.py --calibrate_args="--data.calib.samples_per_step 256 --model.recon.batch_size 64"

For each row ``(preset, method, bits)`` and seed it runs ``gaq calibrate`` (``--calibrate_config``
with the method, bits, preset and seed set; seeds go to ``seed_everything``, the calibration set,
its split and the reconstruction), then ``gaq evaluate --run <run>`` (``--evaluate_config``; the
same evaluation seed for every run, so the rows are compared on the same starting noise), plus one
evaluation of the FP model. It writes ``<out_dir>/<name>.md`` (mean ± sample std over seeds of FID,
sFID, precision, recall, class accuracy, the fidelity to the FP model's samples from the same noise
(PSNR, SSIM, per-sample MSE, FID to FP), the mean per-step noise-prediction MSE against the FP model,
calibration seconds and peak memory) and ``<name>.json`` (every run's numbers, the settings, device
and git commit).

Paired section: runs of two methods with the same seed share the calibration set, its split and the
reconstruction's data order (the seed goes to ``data.calib.seed``, ``data.split.seed`` and
``model.recon.seed``; the calibration set is cached by its config and the FP model, not the method),
so for every pair ``(A, B)`` of ``--pairs`` (default gac vs uniform), bit setting and preset the
table reports the per-seed difference ``A - B`` of each metric and the fraction of B's gap to the FP
model that A closes, per seed, each as mean ± 95% t-interval over the seeds (:func:`paired`).

Runs live in ``<runs_root>/<preset>-<method>-<bits>-s<seed>-<digest>``, where the digest covers
every calibrate argument: rerunning the command reuses finished runs (``summary.json``) and
evaluations made with the same evaluate command (``eval/metrics.json``); a changed setting gets a
new folder. Each command runs in a fresh process (``--in_process false``, the default: clean
memory, its peak host memory measured, multi-GPU DDP possible); ``--in_process true`` runs them in
this process (quicker for tiny CPU runs and tests). A failed run is recorded and the table goes on.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gaq.errors import GaqError, check  # noqa: E402
from gaq.eval.intervals import finite_values, mean_ci  # noqa: E402

# from metrics.json["metrics"]: against real data, then fidelity to the FP model's samples
METRICS = ("fid", "sfid", "precision", "recall", "accuracy",
           "psnr", "psnr_capped", "ssim", "sample_mse", "fid_to_fp", "sfid_to_fp")
# column header, how to read it from one run, number format
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("FID ↓", "fid", "{:.4g}"), ("sFID ↓", "sfid", "{:.4g}"), ("precision ↑", "precision", "{:.3f}"),
    ("recall ↑", "recall", "{:.3f}"), ("class acc. ↑", "accuracy", "{:.3f}"),
    ("PSNR dB ↑", "psnr", "{:.2f}"), ("SSIM ↑", "ssim", "{:.4f}"), ("sample MSE ↓", "sample_mse", "{:.3g}"),
    ("FID to FP ↓", "fid_to_fp", "{:.4g}"), ("step MSE ↓", "timestep_mse", "{:.3g}"),
    ("calib. s", "calibration_seconds", "{:.1f}"), ("peak GPU MiB", "peak_gpu_mib", "{:.0f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
)
RESOURCE_KEYS = ("calibration_seconds", "peak_gpu_mib", "peak_rss_mib")
PAIRED_KEYS = tuple(key for _, key, _ in COLUMNS if key not in RESOURCE_KEYS)  # metrics of the paired differences
# fraction of B's gap to the FP model that A closes, per fidelity metric: "zero" (FP ideal 0), "one" (FP ideal 1),
# or another metric's name (PSNR has no finite ideal: it takes the sample MSE's fraction); see gap_closed
GAP_KINDS = {"sample_mse": "zero", "fid_to_fp": "zero", "timestep_mse": "zero", "ssim": "one", "psnr": "sample_mse"}


def _default_extra_presets() -> dict[str, list[str]]:
    return {"qdiff_compat": ["uniform", "gac"]}


def _default_pairs() -> list[list[str]]:
    return [["gac", "uniform"]]


@dataclass
class TableConfig:
    """The method table's settings.

    Attributes:
        source: the FP model (folder or hub id; default the shipped digits model).
        methods: calibration methods (``rtn``, ``uniform``, ``gac``), or a method with a named variant,
            ``<method>@<name>`` (e.g. ``gac@carry``): the method with ``variants[name]``'s arguments.
        variants: variant name -> more ``gaq calibrate`` arguments (one shell-quoted string, applied
            after ``calibrate_args``), e.g. ``{carry: "--gac.meta_lr 5e-3 --gac.carry_over true"}``;
            a variant and its method share every seed, so they pair on the same calibration set.
        bits: bit settings ``W<w>A<a>`` (A32: weights only).
        seeds: calibration seeds; mean and spread are over these.
        presets: protocol presets every method runs under.
        extra_presets: more presets for some methods only (``{preset: [methods]}``).
        pairs: ``[A, B]`` method pairs of the paired section (A - B per seed, and the fraction of
            B's gap to FP that A closes); a pair whose methods are not both in a row is skipped.
        calibrate_config: the base ``gaq calibrate`` YAML.
        evaluate_config: the base ``gaq evaluate`` YAML.
        iters: reconstruction iterations per unit (``model.recon.iters``); None: the YAML's.
        meta_iters: GAC meta steps per unit (``gac.meta_iters``); None: the YAML's.
        num_samples: evaluation samples; None: the YAML's.
        accelerator: ``trainer.accelerator`` of both commands; None: the YAMLs'.
        devices: ``trainer.devices`` of calibrate (evaluate always uses one); None: the YAML's.
        calibrate_args: more ``gaq calibrate`` arguments as one shell-quoted string, e.g.
            ``--calibrate_args="--data.calib.samples_per_step 256"`` (note the ``=``).
        evaluate_args: more ``gaq evaluate`` arguments, likewise.
        runs_root: where the runs go.
        out_dir: where the table goes.
        name: file stem of the table (``<name>.md`` / ``<name>.json``).
        in_process: run the commands in this process instead of fresh ones.
        reuse: reuse finished runs and matching evaluations.
        jobs: runs (calibrate + evaluate) at a time, each in its own processes; small models leave
            most of a GPU idle, so several share it well. Calibration seconds then include the
            contention: time methods against each other with ``bench/speed_cifar.py`` instead.
    """

    source: str = "checkpoints/default"
    methods: list[str] = field(default_factory=lambda: ["rtn", "uniform", "gac"])
    variants: dict[str, str] = field(default_factory=dict)
    bits: list[str] = field(default_factory=lambda: ["W4A32", "W4A8", "W8A8"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    presets: list[str] = field(default_factory=lambda: ["tfmq_compat"])
    extra_presets: dict[str, list[str]] = field(default_factory=_default_extra_presets)
    pairs: list[list[str]] = field(default_factory=_default_pairs)
    calibrate_config: str = "configs/default/calibrate.yaml"
    evaluate_config: str = "configs/default/evaluate.yaml"
    iters: int | None = None
    meta_iters: int | None = None
    num_samples: int | None = None
    accelerator: str | None = None
    devices: int | None = None
    calibrate_args: str = ""
    evaluate_args: str = ""
    runs_root: str = "checkpoints/runs/method_table"
    out_dir: str = "bench/results"
    name: str = "method_table"
    in_process: bool = False
    reuse: bool = True
    jobs: int = 1


@dataclass
class RunSpec:
    """One calibration run of the table."""

    preset: str
    method: str
    bits: str
    seed: int

    @property
    def w_bits(self) -> int:
        return parse_bits(self.bits)[0]

    @property
    def a_bits(self) -> int:
        return parse_bits(self.bits)[1]


def parse_bits(text: str) -> tuple[int, int]:
    """``"W4A8"`` -> ``(4, 8)``."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", text.strip())
    check(m is not None, f"bit setting {text!r} is not W<bits>A<bits> (e.g. W4A8, W4A32)")
    return int(m.group(1)), int(m.group(2))


def run_specs(cfg: TableConfig) -> list[RunSpec]:
    """Every (preset, method, bits, seed) of the table, in table order."""
    for b in cfg.bits:
        parse_bits(b)
    known = {"rtn", "uniform", "gac"}
    for m in [*cfg.methods, *(m for ms in cfg.extra_presets.values() for m in ms)]:
        base, _, variant = m.partition("@")
        check(base in known, f"unknown method {m!r}; use rtn, uniform or gac, or <method>@<variant>")
        check(not variant or variant in cfg.variants,
              f"method {m!r} names variant {variant!r}, which --variants does not define (has: {sorted(cfg.variants)})")
        known.add(m)
    for pair in cfg.pairs:
        check(len(pair) == 2 and pair[0] != pair[1] and set(pair) <= known,
              f"--pairs entry {pair!r} must be two different methods of {', '.join(sorted(known))}, e.g. [[gac, uniform]]")
    rows = [(p, m) for p in cfg.presets for m in cfg.methods]
    rows += [(p, m) for p, ms in cfg.extra_presets.items() for m in ms if (p, m) not in rows]
    return [RunSpec(p, m, b, s) for p, m in rows for b in cfg.bits for s in cfg.seeds]


def calibrate_args(cfg: TableConfig, spec: RunSpec) -> list[str]:
    """The ``gaq calibrate`` arguments of one run (without ``--run_dir``)."""
    s = str(spec.seed)
    method, _, variant = spec.method.partition("@")
    args = ["--config", cfg.calibrate_config, "--method", method, "--quant.preset", spec.preset,
            "--quant.w_bits", str(spec.w_bits), "--quant.a_bits", str(spec.a_bits), "--data.source", cfg.source,
            "--seed_everything", s, "--data.calib.seed", s, "--data.split.seed", s, "--model.recon.seed", s]
    if cfg.iters is not None:
        args += ["--model.recon.iters", str(cfg.iters)]
    if cfg.meta_iters is not None and method == "gac":
        args += ["--gac.meta_iters", str(cfg.meta_iters)]
    if cfg.accelerator is not None:
        args += ["--trainer.accelerator", cfg.accelerator]
    if cfg.devices is not None:
        args += ["--trainer.devices", str(cfg.devices)]
    return args + shlex.split(cfg.calibrate_args) + (shlex.split(cfg.variants[variant]) if variant else [])


def evaluate_args(cfg: TableConfig, run_dir: Path | None, out_dir: Path) -> list[str]:
    """The ``gaq evaluate`` arguments of one run (``run_dir`` None: the FP model)."""
    args = ["--config", cfg.evaluate_config, "--source", cfg.source, "--out_dir", str(out_dir)]
    if run_dir is not None:
        args += ["--run", str(run_dir)]
    if cfg.num_samples is not None:
        args += ["--num_samples", str(cfg.num_samples)]
    if cfg.accelerator is not None:
        args += ["--trainer.accelerator", cfg.accelerator]
    return args + shlex.split(cfg.evaluate_args)


def run_dir_of(cfg: TableConfig, spec: RunSpec) -> Path:
    digest = hashlib.sha256(json.dumps(calibrate_args(cfg, spec)).encode()).hexdigest()[:8]
    return Path(cfg.runs_root) / f"{spec.preset}-{spec.method}-{spec.bits}-s{spec.seed}-{digest}"


@dataclass
class CommandResult:
    """How one ``gaq`` command went."""

    ok: bool
    seconds: float
    peak_rss_bytes: int | None = None
    error: str | None = None
    log: str | None = None


def run_gaq(subcommand: str, args: list[str], in_process: bool, log_path: Path) -> CommandResult:
    """Run ``gaq <subcommand> <args>``: in a fresh process (output to ``log_path``) or in this one."""
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if in_process:
        from gaq.cli import main as gaq_main
        try:
            gaq_main([subcommand, *args])
        except SystemExit as err:  # gaq.cli turns GaqErrors into exit status 2 after printing them
            if err.code not in (0, None):
                return CommandResult(False, time.perf_counter() - t0, error=f"exit status {err.code}")
        except Exception as err:  # a crash of one run must not lose the others
            return CommandResult(False, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}".splitlines()[0])
        return CommandResult(True, time.perf_counter() - t0)
    cmd = [sys.executable, "-m", "gaq.cli", subcommand, *args]
    with log_path.open("w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * 1024 if sys.platform != "darwin" else usage.ru_maxrss  # KiB on Linux
    if proc.returncode != 0:
        tail = [ln for ln in log_path.read_text().splitlines() if ln.strip()][-1:] or ["no output"]
        return CommandResult(False, time.perf_counter() - t0, rss, f"exit status {proc.returncode}: {tail[0][:300]}",
                             str(log_path))
    return CommandResult(True, time.perf_counter() - t0, rss, log=str(log_path))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def evaluate_once(cfg: TableConfig, run_dir: Path | None, out_dir: Path, log_path: Path) -> tuple[dict | None, CommandResult | None]:
    """``metrics.json`` of an evaluation, reused when it was made by the same command (and, for a run, by
    a gaq that reports the fidelity to FP: older files lack its ``fidelity`` entry)."""
    args = evaluate_args(cfg, run_dir, out_dir)
    command = shlex.join(["gaq", "evaluate", *args])
    existing = _read_json(out_dir / "metrics.json")
    if (cfg.reuse and existing is not None and existing.get("command") == command
            and (run_dir is None or "fidelity" in existing)):
        return existing, None
    result = run_gaq("evaluate", args, cfg.in_process, log_path)
    return (_read_json(out_dir / "metrics.json") if result.ok else None), result


def run_one(cfg: TableConfig, spec: RunSpec, console) -> dict:
    """Calibrate (or reuse) and evaluate one run; returns its record for the JSON."""
    run_dir = run_dir_of(cfg, spec)
    logs = Path(cfg.runs_root) / "logs"
    record: dict[str, Any] = {**asdict(spec), "run_dir": str(run_dir), "status": "ok"}
    summary = _read_json(run_dir / "summary.json") if cfg.reuse else None
    calib = None
    if summary is None:
        calib = run_gaq("calibrate", [*calibrate_args(cfg, spec), "--run_dir", str(run_dir)], cfg.in_process,
                        logs / f"{run_dir.name}.calibrate.log")
        summary = _read_json(run_dir / "summary.json") if calib.ok else None
        if summary is None:
            record.update(status="calibrate failed", error=calib.error, log=calib.log)
            return record
    record["calibration_reused"] = calib is None
    record["calibration_seconds"] = summary.get("calibration_seconds")
    gpu = summary.get("peak_memory_bytes")
    record["peak_gpu_mib"] = None if gpu is None else gpu / 2**20
    record["peak_rss_mib"] = None if calib is None or calib.peak_rss_bytes is None else calib.peak_rss_bytes / 2**20
    record["calibration_device"] = summary.get("device")
    metrics, ev = evaluate_once(cfg, run_dir, run_dir / "eval", logs / f"{run_dir.name}.evaluate.log")
    if metrics is None:
        record.update(status="evaluate failed", error=ev.error if ev else "no metrics.json", log=ev.log if ev else None)
        return record
    record.update({k: metrics["metrics"].get(k) for k in METRICS})
    record["eval_device"] = metrics.get("device")
    record["timestep_mse"] = (metrics.get("timestep_error") or {}).get("mean_mse")
    record["timestep_group_mse"] = (metrics.get("timestep_error") or {}).get("group_mse")
    return record


def mean_std(values: list) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (0 for one value) of the finite values, and their count."""
    xs = finite_values(values)
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def aggregate(records: list[dict], cfg: TableConfig) -> list[dict]:
    """One row per (preset, method, bits): per column the mean, std, 95% half-width and values over the
    seeds that worked."""
    rows = []
    keys = list(dict.fromkeys((r["preset"], r["method"], r["bits"]) for r in records))
    for preset, method, bits in keys:
        group = [r for r in records if (r["preset"], r["method"], r["bits"]) == (preset, method, bits)]
        ok = [r for r in group if r["status"] == "ok"]
        row = {"preset": preset, "method": method, "bits": bits, "seeds": [r["seed"] for r in ok],
               "failed_seeds": [r["seed"] for r in group if r["status"] != "ok"], "columns": {}}
        for _, key, _ in COLUMNS:
            mean, std, n = mean_std([r.get(key) for r in ok])
            row["columns"][key] = {"mean": mean, "std": std, "ci95": mean_ci([r.get(key) for r in ok])[1], "n": n,
                                   "values": [r.get(key) for r in ok]}
        rows.append(row)
    return rows


def _summary(values: list) -> dict:
    """Mean ± 95% t-interval of the finite values (``ci95`` None for one), their count and the values."""
    mean, half = mean_ci(values)
    return {"mean": mean, "ci95": half, "n": len(finite_values(values)), "values": values}


def _difference(a: float | None, b: float | None) -> float | None:
    """``a - b``, or None unless both are finite numbers."""
    return a - b if len(finite_values([a, b])) == 2 else None


def gap_closed(kind: str, a: float | None, b: float | None) -> float | None:
    """The fraction of method B's gap to the FP model that method A closes, for one seed.

    ``kind`` ``zero`` (lower is better, FP ideal 0: sample MSE, FID to FP, step MSE): ``(b - a) / b``;
    ``one`` (SSIM, FP ideal 1): ``(a - b) / (1 - b)``. 1 means A reaches the FP model, 0 no better
    than B, below 0 worse. None where a value is missing or B has no gap.
    """
    if not finite_values([a]) or not finite_values([b]):
        return None
    if kind == "zero":
        return (b - a) / b if b > 0 else None
    check(kind == "one", f"unknown gap kind {kind!r}")
    return (a - b) / (1.0 - b) if b < 1 else None


def paired(records: list[dict], pairs: list[list[str]]) -> list[dict]:
    """Paired comparisons of two methods over the seeds both ran (same seed: same calibration set and split).

    Args:
        records: one dict per run with ``preset``, ``method``, ``bits``, ``seed``, ``status`` and the
            metric values (as :func:`run_one` returns).
        pairs: ``[A, B]`` method pairs.

    Returns:
        One entry per pair, preset and bit setting where both methods have a successful run of a
        common seed: ``a``, ``b``, ``preset``, ``bits``, ``seeds``; ``diff[key]`` the per-seed
        ``A - B`` of every metric of :data:`PAIRED_KEYS`, ``gap_closed[key]`` the per-seed fraction of
        B's gap to FP that A closes (:func:`gap_closed`; PSNR has no finite ideal, its entry is the
        sample MSE's), each :func:`_summary` (mean, 95% half-width ``ci95``, ``n``, per-seed ``values``).
    """
    ok = [r for r in records if r.get("status") == "ok"]
    out = []
    for a, b in pairs:
        cells = list(dict.fromkeys((r["preset"], r["bits"]) for r in ok if r["method"] in (a, b)))
        for preset, bits in cells:
            runs = {m: {r["seed"]: r for r in ok if (r["method"], r["preset"], r["bits"]) == (m, preset, bits)}
                    for m in (a, b)}
            seeds = sorted(set(runs[a]) & set(runs[b]))
            if not seeds:
                continue
            ra, rb = [runs[a][s] for s in seeds], [runs[b][s] for s in seeds]
            diff = {key: _summary([_difference(x.get(key), y.get(key)) for x, y in zip(ra, rb)]) for key in PAIRED_KEYS}
            gap = {key: _summary([gap_closed(kind, x.get(key), y.get(key)) for x, y in zip(ra, rb)])
                   for key, kind in GAP_KINDS.items() if key != "psnr"}
            gap["psnr"] = {**gap[GAP_KINDS["psnr"]], "same_as": GAP_KINDS["psnr"]}
            out.append({"a": a, "b": b, "preset": preset, "bits": bits, "seeds": seeds, "diff": diff, "gap_closed": gap})
    return out


def _cell(col: dict, fmt: str, spread: str = "std") -> str:
    if col["mean"] is None:
        return "–"
    text = fmt.format(col["mean"])
    return text + (f" ± {fmt.format(col[spread])}" if col["n"] > 1 and col.get(spread) is not None else "")


def paired_markdown(pairs: list[dict]) -> list[str]:
    """The paired section's two tables (differences, gap closed) as markdown lines."""
    if not pairs:
        return []
    formats = {key: fmt for _, key, fmt in COLUMNS}
    heads = {key: head.split(" ↑")[0].split(" ↓")[0] for head, key, _ in COLUMNS}
    lines = ["", "## Paired differences", "",
             "Same seed = same calibration set, split and reconstruction data order; per seed A − B, then mean ± 95% "
             "t-interval over the seeds.", ""]
    header = ["preset", "bits", "A − B", "seeds", *[f"Δ {heads[k]}" for k in PAIRED_KEYS]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in pairs:
        cells = [_cell(p["diff"][k], formats[k], "ci95") for k in PAIRED_KEYS]
        lines.append(f"| {p['preset']} | {p['bits']} | {p['a']} − {p['b']} | {','.join(map(str, p['seeds']))} | "
                     + " | ".join(cells) + " |")
    gaps = [k for k in GAP_KINDS if k != "psnr"]
    lines += ["", "Fraction of B's gap to the FP model that A closes, per seed, then mean ± 95% t-interval: "
                  "(b − a) / b for sample MSE, FID to FP and step MSE (ideal 0), (a − b) / (1 − b) for SSIM (ideal 1); "
                  "1 = A matches the FP model, 0 = no better than B. PSNR has no finite ideal: its fraction is the "
                  "sample MSE's.", ""]
    header = ["preset", "bits", "A vs B", "seeds", *[heads[k] + (" (= PSNR)" if k == "sample_mse" else "") for k in gaps]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in pairs:
        cells = [_cell(p["gap_closed"][k], "{:.3f}", "ci95") for k in gaps]
        lines.append(f"| {p['preset']} | {p['bits']} | {p['a']} vs {p['b']} | {','.join(map(str, p['seeds']))} | "
                     + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], fp: dict | None, meta: dict, pairs: list[dict] | None = None) -> str:
    """The table as markdown, with its provenance."""
    lines = [f"# Method table: {meta['source']}", "",
             f"- created {meta['created']}, git commit `{meta['git_commit']}`",
             f"- calibration device: {meta['calibration_device']}; evaluation device: {meta['eval_device']}",
             f"- command: `{meta['command']}`",
             f"- seeds {meta['seeds']}: mean ± sample std over seeds; evaluation: {meta['eval_summary']}",
             f"- runs at a time: {meta.get('jobs', 1)}" + (" (calibration seconds include their contention)"
                                                           if meta.get("jobs", 1) > 1 else ""),
             f"- FID / sFID / precision / recall / class accuracy against the real images on {meta.get('features', '–')} "
             "(see metrics.json of each run for the notes); PSNR / SSIM / sample MSE (per sample, mean over samples) and "
             "FID to FP against the FP model's samples from the same noise, conditions and sampler; step MSE: the "
             "per-step noise-prediction MSE against FP on FP trajectories; peak RSS only when each command runs in "
             "its own process", ""]
    header = ["preset", "method", "bits", "seeds", *[c[0] for c in COLUMNS]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if fp is not None:
        m = fp.get("metrics", {})
        cells = [_cell({"mean": m.get(key), "n": 1}, fmt) if key in METRICS else "–" for _, key, fmt in COLUMNS]
        lines.append("| – | FP | W32A32 | – | " + " | ".join(cells) + " |")
    for r in rows:
        seeds = ",".join(str(s) for s in r["seeds"]) + (f" (failed: {','.join(map(str, r['failed_seeds']))})"
                                                        if r["failed_seeds"] else "")
        cells = [_cell(r["columns"][key], fmt) for _, key, fmt in COLUMNS]
        lines.append(f"| {r['preset']} | {r['method']} | {r['bits']} | {seeds} | " + " | ".join(cells) + " |")
    lines += paired_markdown(pairs or [])
    return "\n".join(lines) + "\n"


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="bench/method_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML with any of the keys below")
    parser.add_class_arguments(TableConfig, None, fail_untyped=True)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the table; returns the JSON content (also written)."""
    from rich.console import Console

    from gaq.provenance import git_commit

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = TableConfig(**{k: ns[k] for k in TableConfig.__dataclass_fields__})
    console = Console(stderr=True)
    specs = run_specs(cfg)
    check(len(specs) > 0, "the table is empty: give at least one method, bit setting and seed")
    check(cfg.jobs >= 1 and (cfg.jobs == 1 or not cfg.in_process), "--jobs must be >= 1, and 1 with --in_process true")
    t0 = time.perf_counter()

    def one(i: int, spec: RunSpec) -> dict:
        record = run_one(cfg, spec, console)
        head = f"[bold][{i + 1}/{len(specs)}][/bold] {spec.preset} {spec.method} {spec.bits} seed {spec.seed}:"
        if record["status"] != "ok":
            console.print(f"{head} [red]{record['status']}[/red]: {record.get('error')}")
        else:
            console.print(f"{head} FID {record.get('fid')}, calibration {record.get('calibration_seconds') or 0:.1f} s")
        return record

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:  # threads only wait on the commands' processes
        records = list(pool.map(one, range(len(specs)), specs))
    console.print("[bold]FP model[/bold]")
    fp_dir = Path(cfg.runs_root) / "fp" / "eval"
    fp, fp_run = evaluate_once(cfg, None, fp_dir, Path(cfg.runs_root) / "logs" / "fp.evaluate.log")
    if fp is None:
        console.print(f"  [red]evaluate failed[/red]: {fp_run.error if fp_run else ''}")
    rows = aggregate(records, cfg)
    pairs = paired(records, cfg.pairs)
    ok = [r for r in records if r["status"] == "ok"]
    eval_meta = fp or (_read_json(Path(ok[0]["run_dir"]) / "eval" / "metrics.json") if ok else None) or {}
    sampling = eval_meta.get("sampling", {})
    meta = {
        "command": shlex.join(["python", "bench/method_table.py", *argv]), "source": cfg.source,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commit": git_commit(),
        "calibration_device": ", ".join(sorted({str(r.get("calibration_device")) for r in ok})) or "–",
        "eval_device": eval_meta.get("device", "–"),
        "features": "; ".join((eval_meta.get("features") or {}).values()) or "–", "seeds": cfg.seeds, "jobs": cfg.jobs, "seconds": time.perf_counter() - t0,
        "eval_summary": (f"{sampling.get('num_samples')} samples, sampler {sampling.get('sampler')}, seed {sampling.get('seed')}"
                         if sampling else "–"),
    }
    result = {"meta": meta, "settings": asdict(cfg), "fp": fp, "rows": rows, "paired": pairs, "runs": records}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{cfg.name}.md").write_text(markdown(rows, fp, meta, pairs))
    failed = [r for r in records if r["status"] != "ok"]
    console.print(f"wrote {out / (cfg.name + '.md')} ({len(records) - len(failed)} runs ok, {len(failed)} failed)")
    print(out / f"{cfg.name}.md")
    return result


if __name__ == "__main__":
    try:
        result = main()
    except GaqError as err:
        print(f"method_table: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    failed = [r for r in result["runs"] if r["status"] != "ok"] or ([] if result["fp"] is not None else ["fp"])
    raise SystemExit(1 if failed else 0)
