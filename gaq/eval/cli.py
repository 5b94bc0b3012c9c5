"""``gaq evaluate``: sample an FP model or a quantized run and measure FID and friends.

``gaq evaluate --config configs/default/evaluate.yaml [--run checkpoints/runs/<run>] [--key value ...]``

The YAML holds the keys of :class:`~gaq.eval.evaluate.EvaluateConfig` at the top level (``source``,
``run``, ``num_samples``, ``sampler``, ``features``, ``reference``, ...) and Lightning's ``trainer``
section (``accelerator: auto`` picks the device; ``callbacks`` with ``class_path`` adds callbacks).
``--print_config`` prints the resolved config. Writes into the output folder (default
``<run>/eval`` or ``runs/eval-fp``): ``metrics.json``, ``metrics.csv``, ``samples_grid.png`` and, for
a run, ``timestep_error.json`` / ``timestep_error.png`` (the FP samples of the fidelity metrics are
cached in ``reference.cache_dir``); prints a table, then the folder as the last line.
"""
from __future__ import annotations

import logging
import math
import shlex
import warnings
from dataclasses import fields
from typing import Any

from jsonargparse import ActionConfigFile
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from gaq.cli_errors import check_config_files, check_trainer_placement, one_line_argument_errors
from gaq.errors import check
from gaq.eval.evaluate import EvaluateConfig

# the evaluation's Trainer defaults: one device, no logger, no checkpoints, no grad-free inference tensors
TRAINER_DEFAULTS: dict[str, Any] = {
    "trainer.devices": 1, "trainer.logger": False, "trainer.enable_checkpointing": False,
    "trainer.enable_model_summary": False, "trainer.inference_mode": False,
}


#: Trainer options that would change or be ignored by the evaluation's one predict pass over ``num_samples``
#: samples in batches of ``batch_size`` (``limit_predict_batches`` would silently drop samples): refused
LOOP_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
                     "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
                     "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
                     "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "fast_dev_run",
                     "reload_dataloaders_every_n_epochs")


def check_trainer_section(parser: LightningArgumentParser, trainer: dict[str, Any]) -> None:
    """The loop options keep their defaults and the placement (accelerator, devices, strategy) exists here."""
    defaults = parser.get_defaults().trainer
    for key in LOOP_TRAINER_KEYS:
        given, default = trainer.get(key), defaults.get(key)
        check(given == default, f"trainer.{key} is not used by gaq evaluate (it samples num_samples in batches of "
                                f"batch_size; lower num_samples for fewer): remove it (got {given!r})")
    check_trainer_placement(trainer)


def check_output_folder(cfg: EvaluateConfig) -> None:
    """The output folder can be written, before any sampling (a missing run folder is reported by the loading)."""
    from pathlib import Path

    from gaq.atomic import check_writable_folder

    if cfg.out_dir or not cfg.run or Path(cfg.run).is_dir():
        check_writable_folder(cfg.output_dir(), "out_dir")


def build_parser() -> LightningArgumentParser:
    """The typed parser of ``gaq evaluate`` (top-level EvaluateConfig keys + the ``trainer`` section)."""
    parser = LightningArgumentParser(
        prog="gaq evaluate", exit_on_error=False,
        description="Sample an FP model or a quantized run (gaq calibrate) and compute FID, sFID, precision/recall, "
                    "class accuracy and, for a run, the per-step error and the fidelity (PSNR, SSIM, MSE, FID) "
                    "to the FP model's samples from the same noise.",
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config file")
    parser.add_class_arguments(EvaluateConfig, None, fail_untyped=True)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.set_defaults(TRAINER_DEFAULTS)
    return parser


def _instantiate(parser: LightningArgumentParser, cfg):
    fn = getattr(parser, "instantiate", None) or parser.instantiate_classes  # `instantiate` from jsonargparse 4.49
    return fn(cfg)


def _setup_logging() -> None:
    from gaq.calib.cli import setup_logging  # gaq's log lines (one per sampled batch) through rich, as calibrate's

    setup_logging()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`instantiate_classes` was deprecated.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")  # inside lightning
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def print_table(result: dict) -> None:
    """The metrics as a rich table (stdout), then the notes."""
    from rich.console import Console
    from rich.table import Table

    model = result.get("model", {})
    what = "FP" if model.get("model") == "fp" else (
        f"{model.get('method')} W{model.get('w_bits')}A{model.get('a_bits')} ({model.get('preset')})")
    table = Table(title=f"gaq evaluate: {what}, {result['samples']['count']} samples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        if isinstance(value, list):
            table.add_row(key, " ".join(_fmt(v) for v in value))
        else:
            table.add_row(key, _fmt(value))
    ts = result.get("timestep_error")
    if ts:
        table.add_row("timestep MSE (mean / max)", f"{_fmt(ts['mean_mse'])} / {_fmt(ts['max_mse'])}")
        if ts.get("group_mse"):
            table.add_row(f"timestep MSE per group ({ts['num_groups']})", " ".join(_fmt(v) for v in ts["group_mse"]))
    console = Console()
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"note: {note}", soft_wrap=True)


def main(argv: list[str]) -> None:
    """Entry point of ``gaq evaluate`` (``argv`` without the subcommand)."""
    from gaq.eval.evaluate import run_evaluation

    _setup_logging()
    check_config_files(argv, "configs/default/evaluate.yaml")
    parser = build_parser()
    with one_line_argument_errors("gaq evaluate"):
        cfg = parser.parse_args(argv)
        init = _instantiate(parser, cfg)
    eval_cfg = EvaluateConfig(**{f.name: init[f.name] for f in fields(EvaluateConfig)})
    trainer_kwargs = dict(init["trainer"])
    check_trainer_section(parser, trainer_kwargs)
    check_output_folder(eval_cfg)
    result = run_evaluation(eval_cfg, trainer_kwargs, command=shlex.join(["gaq", "evaluate", *argv]))
    print_table(result)
    print(eval_cfg.output_dir())
