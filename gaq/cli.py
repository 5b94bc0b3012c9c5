"""The ``gaq`` command: one LightningCLI per subcommand, all configured by YAML.

``gaq <subcommand> --config configs/....yaml [--dotted.key value ...]``. Each subcommand is a
LightningCLI (jsonargparse) parser of its own: ``gaq <subcommand> --help`` lists every key and
``--print_config`` prints the full resolved config. Errors that the user can fix are printed as one
line, ``gaq: error: ...``, with exit status 2.
"""
from __future__ import annotations

import atexit
import importlib
import os
import sys

from gaq.errors import GaqError

# name -> ("module:function" taking argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train-default": ("gaq.train.default:main",
                      "train the shipped default model (digits DDPM + classifier) into checkpoints/"),
    "train-testbed": ("gaq.train.testbed:main",
                      "train the CIFAR-shaped testbed (DDPM on photo crops + classifier) into checkpoints/testbed"),
    "calib-data": ("gaq.calib.cli:main_calib_data",
                   "generate (or reuse) the calibration set of a calibrate config, and nothing else"),
    "calibrate": ("gaq.calib.cli:main", "quantize a diffusion model: RTN, uniform block reconstruction or GAC"),
    "evaluate": ("gaq.eval.cli:main", "sample from an FP model or a quantized run and compute FID and friends"),
}

USAGE = """usage: gaq <subcommand> [--config FILE.yaml] [--key value ...]

gaq quantizes diffusion models (PTQ) with block-wise AdaRound reconstruction and
gradient-aligned calibration (GAC). Every subcommand reads YAML configs (see configs/);
`gaq <subcommand> --help` lists its keys, `--print_config` prints the resolved config.

subcommands:
{rows}

example (the shipped default model, CPU, no downloads):
  gaq calibrate --config configs/default/calibrate.yaml
"""


def _destroy_process_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy this process's torch.distributed group (if any) when the interpreter exits.

    Lightning does that for NCCL groups only; a gloo group (DDP on CPU) left to interpreter shutdown
    can abort the process ("terminate called without an active exception", SIGABRT) after all the
    work is done, which fails the run's exit status. Registering twice is harmless.
    """
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _usage() -> str:
    rows = "\n".join(f"  {name:<14} {text}" for name, (_, text) in SUBCOMMANDS.items())
    return USAGE.format(rows=rows)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"gaq: error: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module_name, function = SUBCOMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), function)
    destroy_process_group_at_exit()  # every DDP rank runs this command line
    try:
        entry(rest)
    except GaqError as err:
        print(f"gaq: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
