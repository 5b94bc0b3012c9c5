"""Quantization protocols as data: the preset YAML files shipped in ``gaq/quant/preset_files/``.

A preset is a YAML mapping with a ``description`` and every key of
:data:`gaq.quant.config.PRESET_KEYS` (which roles stay FP, attention operands on/off, per-step
activation scales, shortcut splitting, ...). Two protocols are compared by swapping the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from gaq.errors import GaqError, check
from gaq.quant.config import PRESET_KEYS

#: Environment variable naming another folder of preset YAML files to use instead of the shipped ones.
PRESET_DIR_ENV = "GAQ_QUANT_PRESETS"
#: The shipped presets' folder inside the package (installed with it as package data).
SHIPPED_PRESET_DIR = Path(__file__).resolve().parent / "preset_files"


def preset_dir() -> Path:
    """The folder preset names are looked up in: ``$GAQ_QUANT_PRESETS``, else the shipped presets."""
    env = os.environ.get(PRESET_DIR_ENV)
    return Path(env) if env else SHIPPED_PRESET_DIR


def available_presets() -> list[str]:
    """Names of the shipped presets (file stems), sorted."""
    folder = preset_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_preset(name_or_path: str) -> tuple[str, Path, dict[str, Any]]:
    """Read and check a preset; returns ``(name, path, values)`` with every preset key present.

    ``name_or_path`` is a shipped preset's name (``tfmq_compat``) or a path to a YAML file.
    """
    check(isinstance(name_or_path, str) and name_or_path, "quant preset must be a preset name or a YAML path")
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        path = candidate
        check(path.is_file(), f"quant preset file {str(path)!r} does not exist")
    else:
        path = preset_dir() / f"{name_or_path}.yaml"
        check(path.is_file(), f"unknown quant preset {name_or_path!r}; available: "
              f"{', '.join(available_presets()) or '<none found in ' + str(preset_dir()) + '>'} (or give a YAML path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GaqError(f"quant preset {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    check(isinstance(data, dict), f"quant preset {str(path)!r} must be a YAML mapping")
    data = dict(data)
    data.pop("description", None)
    unknown = sorted(set(data) - set(PRESET_KEYS))
    check(not unknown, f"quant preset {str(path)!r} has unknown keys {unknown}; allowed: {', '.join(PRESET_KEYS)}")
    missing = [k for k in PRESET_KEYS if k not in data]
    check(not missing, f"quant preset {str(path)!r} lacks keys {missing}: every preset sets all of {', '.join(PRESET_KEYS)}")
    return path.stem, path, data
