"""Quantized models the diffusers way: :func:`from_pretrained` and ``qmodel.save_pretrained(folder)``.

``gaq.from_pretrained(folder)`` rebuilds a quantized model from a folder written by
:func:`gaq.quant.save_quantized` alone (no base model needed): a diffusers model (``UNet2DModel``,
``DiTTransformer2DModel``, ...) whose convolution / linear layers are gaq's fake-quantized layers, with
the calibrated rounding and activation scales, ready to go into a diffusers pipeline in place of the FP
model.

Every quantized model gaq builds gets its own ``save_pretrained`` (on the instance, not the class), so
that diffusers' ``save_pretrained`` and a pipeline's ``save_pretrained`` write gaq's quantized format
instead of the FP weights the fake-quantized layers keep. diffusers' ``from_pretrained`` fails on such
a folder (it has no ``config.json``); it never returns the FP model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import diffusers
from diffusers import ModelMixin
from torch import nn

from gaq.errors import check
from gaq.quant import export


def model_class(name: str) -> type[ModelMixin]:
    """The diffusers model class called ``name``."""
    cls = getattr(diffusers, name, None)
    check(isinstance(cls, type) and issubclass(cls, ModelMixin),
          f"the quantized model's class {name!r} is not a diffusers model class of this diffusers ({diffusers.__version__})")
    return cls


def from_pretrained(folder: str | os.PathLike) -> nn.Module:
    """Load a quantized model saved by :func:`gaq.quant.save_quantized` or ``qmodel.save_pretrained``.

    Args:
        folder: the export folder (``quant_config.json``, ``quantized.safetensors``, ``fp_parts.safetensors``).

    Returns:
        the quantized diffusers model in eval mode on the CPU, with weight and activation quantization
        as they were when it was saved; it gives the same outputs as the model that was saved.

    Raises:
        GaqError: not a gaq export, a damaged or inconsistent one, or one written without its FP parts
            (by an older gaq: load that with :func:`gaq.quant.load_quantized` and its base model).
    """
    folder = Path(folder)
    meta = export.read_quant_config(folder)
    config = meta.get("model_config")
    check(isinstance(config, dict) and (folder / export.FP_PARTS_FILE).is_file(),
          f"{str(folder)!r} holds only the quantized parts of the model (exported by an older gaq): load it with "
          "gaq.quant.load_quantized(folder, base_model), or re-export it")
    model = model_class(meta["base_class"]).from_config(config)
    arch = export.architecture_fingerprint(model)
    check(arch == meta["base_arch_fingerprint"],
          f"{str(folder)!r}: its model_config builds architecture {arch}, not the quantized one "
          f"({meta['base_arch_fingerprint']}): the folder is damaged; re-export the quantized model")
    fp_parts = export.read_tensors(folder, export.FP_PARTS_FILE, meta)
    return export.rebuild_quantized(folder, meta, model, fp_parts).eval()


class QuantizedSavePretrained:
    """diffusers' ``save_pretrained`` for a gaq-quantized model (set on the instance): writes gaq's
    quantized format (:func:`gaq.quant.save_quantized`), which :func:`gaq.from_pretrained` loads back.

    A plain object rather than a bound method, so that the model still deep-copies and pickles with it.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False,
                 **kwargs: Any) -> None:
        check(not push_to_hub, "push_to_hub is not supported for gaq-quantized models: save_pretrained(folder) "
              "and upload the folder")
        check(kwargs.get("variant") is None, "variant= is not supported for gaq-quantized models: leave it out")
        if is_main_process:
            export.save_quantized(self.model, save_directory)


def install_save_pretrained(qmodel: nn.Module) -> None:
    """Give the quantized diffusers model ``qmodel`` gaq's ``save_pretrained`` (this instance only)."""
    if isinstance(qmodel, ModelMixin):
        qmodel.save_pretrained = QuantizedSavePretrained(qmodel)


__all__ = ["QuantizedSavePretrained", "from_pretrained", "install_save_pretrained", "model_class"]
