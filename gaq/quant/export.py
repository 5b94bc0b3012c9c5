"""Saving and loading quantized models: safetensors + JSON, no pickle.

A folder holds:

- ``quantized.safetensors``: per quantized layer the integer weight codes bit-packed into uint8
  (``<path>.weight_codes``), the float32 ``<path>.weight_scale`` / ``<path>.weight_zero_point``
  (``(C_out, G)``, G = input groups of a split layer); per activation quantizer its ``scale``,
  ``zero_point``, running range and counts; ``gaq.timesteps`` for per-step scales;
- ``quant_config.json``: the base model's source and fingerprints, preset, bits, the resolved
  settings and the per-layer plan (bits, splits), the gaq version and caller metadata.

Everything else (biases, norms, embeddings, layers kept FP) comes from the base model given to
:func:`load_quantized`, which must be the model that was quantized (checked by fingerprint).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import gaq
from gaq.atomic import atomic_write
from gaq.errors import GaqError, check
from gaq.quant.adaround import AdaRoundQuantizer
from gaq.quant.config import QuantConfig, QuantSettings
from gaq.quant.quantizer import ActQuantizer
from gaq.quant.wrap import QuantPlan, build_quantized, iter_act_quantizers, iter_quant_layers, quant_info, set_quant_state

FORMAT = "gaq-quantized-1"
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quant_config.json"
ACT_BUFFERS = ("scale", "zero_point", "x_min", "x_max", "count")
TIMESTEPS_KEY = "gaq.timesteps"
PACK_CHUNK = 1 << 22  # codes per packing chunk (a multiple of 8); memory only


def architecture_fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit hash of a model's config (if any) and its state-dict keys and shapes (not values)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- bit packing

def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Bit-pack integer codes (values < 2^bits) into uint8, little-endian bit order, 1-D."""
    flat = codes.detach().reshape(-1).to("cpu", torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(flat.copy())
    out = []
    for i in range(0, flat.size, PACK_CHUNK):
        planes = np.unpackbits(flat[i:i + PACK_CHUNK, None], axis=1, count=bits, bitorder="little")
        out.append(np.packbits(planes.reshape(-1), bitorder="little"))
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.uint8))


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` uint8 codes."""
    data = packed.reshape(-1).to("cpu", torch.uint8).numpy()
    check(data.size == packed_size(numel, bits), f"packed weight codes have {data.size} bytes, expected {packed_size(numel, bits)}")
    if bits == 8:
        return torch.from_numpy(data.copy())
    out = []
    for i in range(0, numel, PACK_CHUNK):
        n = min(PACK_CHUNK, numel - i)
        chunk = data[i * bits // 8: i * bits // 8 + packed_size(n, bits)]
        planes = np.unpackbits(chunk, count=n * bits, bitorder="little").reshape(n, bits)
        out.append(np.packbits(planes, axis=1, bitorder="little").reshape(-1))
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.uint8))


def packed_size(numel: int, bits: int) -> int:
    """Bytes of ``numel`` packed ``bits``-bit codes."""
    return math.ceil(numel * bits / 8)


# ---------------------------------------------------------------- file layout

def _expected_entries(qmodel: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor key of the export of ``qmodel`` with its shape and dtype."""
    entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path, layer in iter_quant_layers(qmodel):
        wq = layer.weight_quantizer
        entries[f"{path}.weight_codes"] = ((packed_size(layer.weight.numel(), wq.bits),), torch.uint8)
        entries[f"{path}.weight_scale"] = (tuple(wq.scale.shape), torch.float32)
        entries[f"{path}.weight_zero_point"] = (tuple(wq.zero_point.shape), torch.float32)
    for path, q in iter_act_quantizers(qmodel):
        for buf in ACT_BUFFERS:
            entries[f"{path}.{buf}"] = ((q.num_steps,), torch.float32)
    ctx = quant_info(qmodel).context
    if ctx.timesteps is not None:
        entries[TIMESTEPS_KEY] = (tuple(ctx.timesteps.shape), torch.float64)
    return entries


def _plan_hash(settings: dict, plan: dict) -> str:
    return hashlib.sha256(json.dumps({"settings": settings, "plan": plan}, sort_keys=True).encode()).hexdigest()


def save_quantized(qmodel: nn.Module, folder: str | os.PathLike, base_source: str, config: QuantConfig,
                   extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``qmodel`` to ``folder`` (created) as ``quantized.safetensors`` + ``quant_config.json``.

    Weight codes are the hard codes of the current rounding (soft rounding is not exported).
    Returns the folder.
    """
    info = quant_info(qmodel)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for path, layer in iter_quant_layers(qmodel):
            wq = layer.weight_quantizer
            tensors[f"{path}.weight_codes"] = pack_codes(layer.integer_codes(), wq.bits)
            tensors[f"{path}.weight_scale"] = wq.scale.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{path}.weight_zero_point"] = wq.zero_point.detach().to("cpu", torch.float32).contiguous()
        for path, q in iter_act_quantizers(qmodel):
            for buf in ACT_BUFFERS:
                tensors[f"{path}.{buf}"] = getattr(q, buf).detach().to("cpu", torch.float32).contiguous()
    if info.context.timesteps is not None:
        tensors[TIMESTEPS_KEY] = info.context.timesteps.clone()
    settings, plan = info.settings.to_dict(), info.plan.to_dict()
    digest = _plan_hash(settings, plan)
    atomic_write(folder / WEIGHTS_FILE,
                        lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "plan_sha256": digest}))
    weight_on = any(q.enabled for q in qmodel.modules() if isinstance(q, AdaRoundQuantizer))
    act_on = any(q.enabled for q in qmodel.modules() if isinstance(q, ActQuantizer))
    meta = {
        "format": FORMAT, "gaq_version": gaq.__version__, "base_source": base_source,
        "base_class": type(qmodel).__name__, "base_fingerprint": info.base_fingerprint,
        "base_arch_fingerprint": info.base_arch, "preset": info.settings.preset,
        "w_bits": info.settings.w_bits, "a_bits": info.settings.a_bits,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "settings": settings, "plan": plan, "plan_sha256": digest,
        "quant_state": {"weight": weight_on, "act": act_on}, "extra": dict(extra_meta or {}),
    }
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(text))
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    cfg_path, st_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    check(cfg_path.is_file() and st_path.is_file(),
          f"{str(folder)!r} is not a gaq quantized-model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GaqError(f"{str(cfg_path)!r} is corrupt ({err.__class__.__name__}): re-export the quantized model") from None
    check(isinstance(meta, dict) and meta.get("format") == FORMAT,
          f"{str(cfg_path)!r} is not a {FORMAT} file: re-export the quantized model with this gaq version")
    return meta


def read_quant_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``quant_config.json`` of a saved quantized model (base source, preset, bits, ...)."""
    return _read_meta(Path(folder))


def load_quantized(folder: str | os.PathLike, base_model: nn.Module) -> nn.Module:
    """Rebuild a saved quantized model on top of ``base_model`` (a copy; ``base_model`` is untouched).

    ``base_model`` must be the FP model that was quantized (same architecture and weights). Raises
    :class:`GaqError` for a different model, a missing / extra / misshapen tensor, or a corrupt file.
    """
    from gaq.models.loading import model_fingerprint

    folder = Path(folder)
    meta = _read_meta(folder)
    arch = architecture_fingerprint(base_model)
    check(arch == meta["base_arch_fingerprint"],
          f"the base model ({type(base_model).__name__}, architecture {arch}) is not the architecture this quantized "
          f"model was made from ({meta['base_class']}, {meta['base_arch_fingerprint']}, source {meta['base_source']!r})")
    fp = model_fingerprint(base_model)
    check(fp == meta["base_fingerprint"],
          f"the base model's weights (fingerprint {fp}) differ from the ones quantized ({meta['base_fingerprint']}): "
          f"load the base model from {meta['base_source']!r} in float32")
    st_path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(st_path), framework="pt") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise GaqError(f"{str(st_path)!r} is truncated or corrupt ({type(err).__name__}): re-export the quantized model") from None
    check(file_meta.get("plan_sha256") == meta.get("plan_sha256"),
          f"{WEIGHTS_FILE} and {CONFIG_FILE} in {str(folder)!r} come from different exports: re-export the quantized model")

    settings, plan = QuantSettings.from_dict(meta["settings"]), QuantPlan.from_dict(meta["plan"])
    timesteps = tensors.get(TIMESTEPS_KEY)
    qmodel = build_quantized(copy.deepcopy(base_model), settings, plan, timesteps, init_ranges=False)
    info = quant_info(qmodel)
    info.base_fingerprint, info.base_arch, info.config = meta["base_fingerprint"], arch, meta.get("config", {})

    expected = _expected_entries(qmodel)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    check(not missing, f"{str(st_path)!r} lacks {len(missing)} tensors the base model needs (first: {missing[0] if missing else ''}): "
          "it was made for another model or is damaged")
    check(not extra, f"{str(st_path)!r} has {len(extra)} tensors the base model has no place for "
          f"(first: {extra[0] if extra else ''}): it was made for another model")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        check(tuple(t.shape) == shape and t.dtype == dtype,
              f"{str(st_path)!r}: tensor {key} has shape {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")

    with torch.no_grad():
        for path, layer in iter_quant_layers(qmodel):
            wq = layer.weight_quantizer
            codes = unpack_codes(tensors[f"{path}.weight_codes"], wq.bits, layer.weight.numel())
            check(int(codes.max()) <= wq.qmax if codes.numel() else True,
                  f"{str(st_path)!r}: weight codes of {path} exceed {wq.bits} bits")
            wq.scale.copy_(tensors[f"{path}.weight_scale"])
            wq.zero_point.copy_(tensors[f"{path}.weight_zero_point"])
            s, z = wq.expanded(layer.weight.ndim)
            codes = codes.to(device=layer.weight.device, dtype=layer.weight.dtype).view(layer.weight.shape)
            layer.weight.copy_((codes - z) * s)  # nearest rounding of this weight gives back exactly these codes
            wq.rtn()
            wq.init_alpha(layer.weight)
        for path, q in iter_act_quantizers(qmodel):
            for buf in ACT_BUFFERS:
                getattr(q, buf).copy_(tensors[f"{path}.{buf}"])
            q.ready = bool(q.count.sum() > 0)
    state = meta.get("quant_state", {})
    set_quant_state(qmodel, weight=bool(state.get("weight", True)), act=bool(state.get("act", False)))
    return qmodel


def stored_weight_bytes(qmodel: nn.Module) -> tuple[int, int]:
    """``(quantized_bytes, fp_bytes)``: the true storage of the quantized model and of its FP original.

    ``quantized_bytes`` counts each quantized weight at its bit width (packed), its float32 scales and
    zero points, the float32 scales and zero points of activation quantizers, and every other tensor
    of the model (biases, norms, embeddings, layers kept FP) at its own dtype. ``fp_bytes`` counts the
    same model with every weight in its FP dtype and no quantization parameters.
    """
    quant_paths = {name for name, m in qmodel.named_modules() if isinstance(m, (AdaRoundQuantizer, ActQuantizer))}
    qlayers = dict(iter_quant_layers(qmodel))
    quant = fp = 0
    for path, layer in qlayers.items():
        wq = layer.weight_quantizer
        quant += packed_size(layer.weight.numel(), wq.bits) + 4 * (wq.scale.numel() + wq.zero_point.numel())
        fp += layer.weight.numel() * layer.weight.element_size()
    for _, q in iter_act_quantizers(qmodel):
        quant += 4 * (q.scale.numel() + q.zero_point.numel())
    seen: set[int] = set()
    for key, tensor in qmodel.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quant_paths or (owner in qlayers and leaf == "weight") or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        quant += nbytes
        fp += nbytes
    return quant, fp
