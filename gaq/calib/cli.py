"""``gaq calibrate`` and ``gaq calib-data``: LightningCLI over the calibration DataModule and the per-unit module.

The YAML has LightningCLI's sections: ``trainer`` (devices, strategy, precision, callbacks: used for
every unit's ``fit``), ``model`` (the per-unit reconstruction module's settings, ``recon``), ``data``
(the model source, the calibration set and its split), plus gaq's own ``quant``, ``method``,
``gac`` and ``run_dir``. ``gaq calibrate --config configs/default/calibrate.yaml --print_config``
prints all of it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from gaq.calib.checkpoints import AtomicCheckpointIO, UnitCheckpoint, config_digest
from gaq.calib.driver import CalibrationJob, run_calibration
from gaq.calib.gac import GACConfig
from gaq.calib.gac_driver import DiagnosticsConfig
from gaq.calib.recon import UnitReconstruction
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


def _build_cli(argv: list[str]) -> CalibrateCLI:
    return CalibrateCLI(
        UnitReconstruction, CalibrationDataModule, args=argv, run=False, save_config_callback=None,
        seed_everything_default=0,
        trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0, "enable_model_summary": False,
                          "logger": False, "enable_checkpointing": False},
        parser_kwargs={"description": "Quantize a diffusion model (RTN, uniform reconstruction or GAC)."},
    )


def _record(cli: CalibrateCLI, dm: CalibrationDataModule) -> dict[str, Any]:
    """What a run's results depend on (written to run.json and compared on resume; devices excluded)."""
    c = cli.config
    return {
        "model": dm.denoiser.source, "model_fingerprint": dm.denoiser.fingerprint,
        "calibration_set": dm.calib_set.meta.get("key", dm.calib_set.meta),
        "split": _plain(c.data.split), "quant": _plain(c.quant), "method": c.method,
        "recon": _plain(c.model.recon), "gac": _plain(c.gac) if c.method == "gac" else None,
    }


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _run_dir(cli: CalibrateCLI, record: dict) -> Path:
    c = cli.config
    if c.run_dir:
        return Path(c.run_dir)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", c.name)
    return Path(c.runs_root) / f"{name}-{c.method}-w{c.quant.w_bits}a{c.quant.a_bits}-{config_digest(record)[:8]}"


def _trainer_factory(cli: CalibrateCLI, run_dir: Path):
    user_callbacks = list(cli.config_init.trainer.get("callbacks") or [])

    def make(unit_dir: Path, unit_name: str):
        ckpt = UnitCheckpoint(unit_dir)
        callbacks = [cb for cb in user_callbacks if not isinstance(cb, (RichProgressBar, ModelCheckpoint))]
        if cli.config.trainer.get("enable_progress_bar") is not False:
            callbacks.append(RichProgressBar(leave=False))
        callbacks.append(ckpt)
        return cli.instantiate_trainer(
            callbacks=callbacks, default_root_dir=str(unit_dir), max_epochs=1, max_steps=-1,
            use_distributed_sampler=False, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
            limit_val_batches=0, enable_checkpointing=False,
            logger=CSVLogger(str(run_dir), name="logs", version=unit_dir.name),
        )

    return make


def _prepare_data(cli: CalibrateCLI) -> CalibrationDataModule:
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    return dm


def main(argv: list[str]) -> None:
    """``gaq calibrate``: the main job."""
    setup_logging()
    cli = _build_cli(argv)
    dm = _prepare_data(cli)
    record = _record(cli, dm)
    run_dir = _run_dir(cli, record)
    hooks = None
    if cli.config.method == "gac":
        from gaq.calib.gac_driver import GACHooks
        hooks = GACHooks(cli.config_init.gac, dm, run_dir, cli.config_init.diagnostics)
    job = CalibrationJob(
        denoiser=dm.denoiser, datamodule=dm, quant=cli.config_init.quant, method=cli.config.method,
        recon=cli.model.recon, run_dir=run_dir, make_trainer=_trainer_factory(cli, run_dir),
        device=cli.trainer.strategy.root_device, record=record, method_hooks=hooks,
        end_callbacks=list(cli.config_init.trainer.get("callbacks") or []),
    )
    summary = run_calibration(job)
    if cli.trainer.is_global_zero:
        log.info("calibrated %s (%s, W%dA%d) in %.1f s: %d units", summary["model"], summary["method"],
                 summary["w_bits"], summary["a_bits"], summary["calibration_seconds"], summary["num_units"])
        print(run_dir)


def main_calib_data(argv: list[str]) -> None:
    """``gaq calib-data``: generate (or reuse) the calibration set of a calibrate config, and nothing else."""
    setup_logging()
    cli = _build_cli(argv)
    dm = _prepare_data(cli)
    log.info("calibration set: %d tuples (%d train, %d validation)", len(dm.calib_set), len(dm.train_indices),
             len(dm.val_indices))
    print(dm.calib_path)

