"""``gaq calibrate`` and ``gaq calib-data``: LightningCLI over the calibration DataModule and the per-unit module.

The YAML has LightningCLI's sections: ``trainer`` (devices, strategy, precision, callbacks: used for
every unit's ``fit``), ``model`` (the per-unit reconstruction module's settings, ``recon``), ``data``
(the model source, the calibration set and its split), plus gaq's own ``quant``, ``method``,
``gac`` and ``run_dir``. ``gaq calibrate --config configs/default/calibrate.yaml --print_config``
prints all of it.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional

from lightning.pytorch.cli import LightningCLI

from gaq.calib.api import (ENGINE_TRAINER_KEYS, CalibrationConfig, calibrate, check_cache_dir, check_sample_device,
                           default_run_dir, run_record)
from gaq.calib.gac import GACConfig
from gaq.cli_errors import check_config_files, one_line_argument_errors, trainer_error_line
from gaq.calib.gac_driver import DiagnosticsConfig
from gaq.calib.recon import UnitReconstruction
from gaq.data.calibset import cache_key
from gaq.errors import GaqError, check
from gaq.data.datamodule import CalibrationDataModule
from gaq.quant import QuantConfig

log = logging.getLogger("gaq")


class CalibrateCLI(LightningCLI):
    """LightningCLI with gaq's quantization, method and run-folder arguments."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(QuantConfig, "quant", fail_untyped=True)
        parser.add_argument("--method", type=Literal["rtn", "uniform", "gac"], default="uniform",
                            help="rtn: nearest rounding; uniform: AdaRound block reconstruction; gac: gradient-aligned")
        parser.add_class_arguments(GACConfig, "gac", fail_untyped=True)
        parser.add_class_arguments(DiagnosticsConfig, "diagnostics", fail_untyped=True)
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="run folder; default: <runs_root>/<name>-<method>-w<W>a<A>-<digest of the config>")
        parser.add_argument("--runs_root", type=str, default="checkpoints/runs")
        parser.add_argument("--name", type=str, default="run", help="prefix of the default run folder name")
        parser.add_argument("--units", type=Optional[list[str]], default=None,
                            help="unit filter: glob patterns on unit names or kind:<kind>; the others keep nearest rounding "
                                 "and their calibrated activation ranges (no activation step-size phase)")
        parser.add_argument("--on_unit_error", type=Literal["raise", "skip"], default="raise",
                            help="raise: a failing unit stops the run; skip: it keeps nearest rounding and the run goes on")

    def parse_arguments(self, parser, args) -> None:
        """``--help`` lists gaq's own options first and the Lightning Trainer's last (most of the list)."""
        groups = parser._action_groups
        trainer = [g for g in groups if any(getattr(a, "dest", "").startswith("trainer.") for a in g._group_actions)]
        parser._action_groups = [g for g in groups if g not in trainer] + trainer
        if trainer:
            parser.epilog = ("The Lightning Trainer's options (trainer.*) come last; gaq sets the loop ones itself "
                             "(trainer.max_steps and the like are refused).")
        super().parse_arguments(parser, args)


def setup_logging() -> None:
    import warnings

    from rich.logging import RichHandler
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    logger = logging.getLogger("gaq")
    if not logger.handlers:
        logger.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for name in ("lightning.pytorch", "lightning.fabric"):  # one Trainer per unit: keep their banners quiet
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_engine_trainer_keys(cli: CalibrateCLI) -> None:
    defaults = cli.parser.get_defaults().trainer
    for key in ENGINE_TRAINER_KEYS:
        given, default = cli.config.trainer.get(key), defaults.get(key)
        check(given == default, f"trainer.{key} is not used by gaq calibrate (each unit runs model.recon.iters "
                                f"iterations with its own checkpoints and logs): remove it (got {given!r})")


def _build_cli(argv: list[str]) -> CalibrateCLI:
    check_config_files(argv, "configs/default/calibrate.yaml")
    try:
        with one_line_argument_errors("gaq calibrate"):
            cli = CalibrateCLI(
                UnitReconstruction, CalibrationDataModule, args=argv, run=False, save_config_callback=None,
                seed_everything_default=0, auto_configure_optimizers=False,
                trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0, "enable_model_summary": False,
                                  "logger": False, "enable_checkpointing": False},
                parser_kwargs={"description": "Quantize a diffusion model (RTN, uniform reconstruction or GAC).",
                               "exit_on_error": False},
            )
    except Exception as err:  # Lightning's refusal of the trainer section (devices, accelerator, strategy)
        line = trainer_error_line(err)
        if line is None:
            raise
        raise GaqError(f"trainer: {line}; change trainer.accelerator / trainer.devices / trainer.strategy") from None
    _check_engine_trainer_keys(cli)
    check_sample_device(cli.datamodule.device)
    return cli


def calibration_config(cli: CalibrateCLI) -> CalibrationConfig:
    """The :class:`CalibrationConfig` of the parsed YAML."""
    c = cli.config_init
    return CalibrationConfig(method=c.method, quant=c.quant, recon=cli.model.recon, gac=c.gac,
                             diagnostics=c.diagnostics, split=cli.datamodule.split, units=c.units,
                             on_unit_error=c.on_unit_error)


def main(argv: list[str]) -> None:
    """``gaq calibrate``: parse the YAML and call :func:`gaq.calibrate`."""
    setup_logging()
    cli = _build_cli(argv)
    config, dm = calibration_config(cli), cli.datamodule
    run_dir = cli.config.run_dir
    if not run_dir:  # named after the run's record, as the verb will write it
        run_dir = default_run_dir(cli.config.runs_root, cli.config.name, config,
                                  run_record(dm.denoiser, cache_key(dm.denoiser, dm.calib), config))
    trainer = {k: v for k, v in cli.config_init.trainer.items() if k not in ENGINE_TRAINER_KEYS}  # checked: defaults
    qmodel = calibrate(dm.denoiser, config, dm.calib, run_dir=run_dir, trainer=trainer,
                       cache_dir=dm.cache_dir, sample_device=dm.device,
                       end_callbacks=list(cli.config_init.trainer.get("callbacks") or []))
    summary = qmodel.gaq_summary
    if cli.trainer.is_global_zero:
        log.info("calibrated %s (%s, W%dA%d) in %.1f s: %d units", summary["model"], summary["method"],
                 summary["w_bits"], summary["a_bits"], summary["calibration_seconds"], summary["num_units"])
        print(run_dir)


def _prepare_data(cli: CalibrateCLI) -> CalibrationDataModule:
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    return dm


def main_calib_data(argv: list[str]) -> None:
    """``gaq calib-data``: generate (or reuse) the calibration set of a calibrate config, and nothing else."""
    from gaq.quant.config import resolve_config

    setup_logging()
    cli = _build_cli(argv)
    resolve_config(cli.config_init.quant)  # the config's other settings are refused here too, before any work
    check_cache_dir(cli.datamodule.denoiser, cli.datamodule.calib, cli.datamodule.cache_dir)
    dm = _prepare_data(cli)
    log.info("calibration set: %d tuples (%d train, %d validation)", len(dm.calib_set), len(dm.train_indices),
             len(dm.val_indices))
    print(dm.calib_path)

