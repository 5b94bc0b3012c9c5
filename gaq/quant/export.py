"""Saving and loading quantized models: safetensors + JSON, no pickle.

A folder holds:

- ``quantized.safetensors``: per quantized layer the integer weight codes bit-packed into uint8
  (``<path>.weight_codes``), the float32 ``<path>.weight_scale`` / ``<path>.weight_zero_point``
  (``(C_out, G)``, G = input groups of a split layer); per activation quantizer its ``scale``,
  ``zero_point``, running range and counts; ``gaq.timesteps`` for per-step scales;
- ``fp_parts.safetensors``: every other tensor of the model (biases, norms, embeddings, layers kept
  FP) under its usual state-dict key, at its own dtype;
- ``quant_config.json``: the model class and its public diffusers config (``model_config``), the base
  model's source and fingerprints, preset, bits, the resolved settings and the per-layer plan (bits,
  splits), the gaq version and caller metadata.

The folder is self-contained: :func:`gaq.from_pretrained` (:mod:`gaq.quant.pretrained`) rebuilds the
quantized model from it alone. :func:`load_quantized` rebuilds it on a given base model instead (which
must be the model that was quantized, checked by fingerprint) and reads only the quantized parts. There
is deliberately no ``config.json`` and no ``diffusion_pytorch_model.*``: diffusers' own
``from_pretrained`` fails on the folder instead of returning an FP model.
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
from gaq.provenance import json_digest
from gaq.errors import GaqError, check
from gaq.quant.adaround import AdaRoundQuantizer
from gaq.quant.config import QuantConfig, QuantSettings
from gaq.quant.quantizer import ActQuantizer
from gaq.quant.wrap import QuantPlan, build_quantized, iter_act_quantizers, iter_quant_layers, quant_info, set_quant_state

FORMAT = "gaq-quantized-1"
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quant_config.json"
FP_PARTS_FILE = "fp_parts.safetensors"
ACT_BUFFERS = ("scale", "zero_point", "x_min", "x_max", "count")
TIMESTEPS_KEY = "gaq.timesteps"
PACK_CHUNK = 1 << 22  # codes per packing chunk (a multiple of 8); memory only


def public_config(model: nn.Module) -> dict[str, Any] | None:
    """A model's config without diffusers' private keys (``_name_or_path``, ``_diffusers_version``, ...),
    as plain JSON data; None for a model without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not str(k).startswith("_")},
                                 sort_keys=True, default=str))


def architecture_fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit hash of a model's class, public config (if any) and state-dict keys and shapes (not values).

    Private config keys are left out, so the same architecture hashes the same whatever path (relative,
    absolute, a copy) it was loaded from, and in memory.
    """
    return _arch_hash(model, public_config(model))


def _legacy_architecture_fingerprint(model: nn.Module) -> str:
    """The fingerprint gaq wrote before private config keys were left out (accepted when loading old exports)."""
    config = getattr(model, "config", None)
    return _arch_hash(model, None if config is None else dict(config))


def _arch_hash(model: nn.Module, config: dict[str, Any] | None) -> str:
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    if config is not None:
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
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
    return json_digest({"settings": settings, "plan": plan}, length=None)


def _fp_parts(qmodel: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries of ``qmodel`` that are not quantization state: everything but the
    quantizers' buffers and the (fake-quantized) weights of quantized layers."""
    quant_paths = {name for name, m in qmodel.named_modules() if isinstance(m, (AdaRoundQuantizer, ActQuantizer))}
    qlayers = {name for name, _ in iter_quant_layers(qmodel)}
    parts = {}
    for key, tensor in qmodel.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        prefixes = owner.split(".")
        if (any(".".join(prefixes[:i]) in quant_paths for i in range(1, len(prefixes) + 1))
                or (owner in qlayers and leaf == "weight")):
            continue
        parts[key] = tensor
    return parts


def save_quantized(qmodel: nn.Module, folder: str | os.PathLike, base_source: str | None = None,
                   config: QuantConfig | dict[str, Any] | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``qmodel`` to ``folder`` (created) as ``quantized.safetensors``, ``fp_parts.safetensors`` and
    ``quant_config.json``; :func:`gaq.from_pretrained` loads it back.

    Weight codes are the hard codes of the current rounding (soft rounding is not exported).
    ``base_source`` (where the FP model came from) and ``config`` (the :class:`QuantConfig`) are
    metadata; they default to what :func:`gaq.quantize` recorded. Returns the folder.
    """
    info = quant_info(qmodel)
    base_source = info.source if base_source is None else base_source
    config = info.config if config is None else config
    folder = Path(folder)
    check(not folder.exists() or folder.is_dir(), f"{folder} is a file: save the quantized model to a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GaqError(f"cannot create {folder} ({err.strerror}): save the quantized model somewhere writable") from None
    check(os.access(folder, os.W_OK), f"{folder} is not writable: save the quantized model somewhere writable")
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
    header = {"format": FORMAT, "plan_sha256": digest}
    fp_parts = {k: t.detach().to("cpu").contiguous().clone() for k, t in _fp_parts(qmodel).items()}
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=header))
    atomic_write(folder / FP_PARTS_FILE, lambda p: save_file(fp_parts, str(p), metadata=header))
    weight_on = any(q.enabled for q in qmodel.modules() if isinstance(q, AdaRoundQuantizer))
    act_on = any(q.enabled for q in qmodel.modules() if isinstance(q, ActQuantizer))
    meta = {
        "format": FORMAT, "gaq_version": gaq.__version__, "base_source": base_source,
        "base_class": type(qmodel).__name__, "model_config": public_config(qmodel),
        "base_fingerprint": info.base_fingerprint,
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
    To load a folder on its own, use :func:`gaq.from_pretrained`.
    """
    from gaq.models.loading import model_fingerprint

    folder = Path(folder)
    meta = _read_meta(folder)
    arch = architecture_fingerprint(base_model)
    check(meta["base_arch_fingerprint"] in (arch, _legacy_architecture_fingerprint(base_model)),
          f"the base model ({type(base_model).__name__}, architecture {arch}) is not the architecture this quantized "
          f"model was made from ({meta['base_class']}, {meta['base_arch_fingerprint']}, source {meta['base_source']!r})")
    fp = model_fingerprint(base_model)
    check(fp == meta["base_fingerprint"],
          f"the base model's weights (fingerprint {fp}) differ from the ones quantized ({meta['base_fingerprint']}): "
          f"load the base model from {meta['base_source']!r} in float32")
    return rebuild_quantized(folder, meta, copy.deepcopy(base_model))


def read_tensors(folder: Path, filename: str, meta: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of one safetensors file of an export, checked to come from the same export as ``meta``."""
    path = folder / filename
    check(path.is_file(), f"{str(folder)!r} has no {filename}: re-export the quantized model")
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise GaqError(f"{str(path)!r} is truncated or corrupt ({type(err).__name__}): re-export the quantized model") from None
    check(file_meta.get("plan_sha256") == meta.get("plan_sha256"),
          f"{filename} and {CONFIG_FILE} in {str(folder)!r} come from different exports: re-export the quantized model")
    return tensors


def rebuild_quantized(folder: Path, meta: dict[str, Any], model: nn.Module,
                      fp_parts: dict[str, Tensor] | None = None) -> nn.Module:
    """Turn ``model`` (modified in place) into the quantized model saved in ``folder`` (``meta``: its config).

    ``fp_parts`` (the export's non-quantized tensors) are loaded into it when given; without them
    ``model`` must already hold the base model's weights.
    """
    st_path = folder / WEIGHTS_FILE
    tensors = read_tensors(folder, WEIGHTS_FILE, meta)
    settings, plan = QuantSettings.from_dict(meta["settings"]), QuantPlan.from_dict(meta["plan"])
    timesteps = tensors.get(TIMESTEPS_KEY)
    arch = architecture_fingerprint(model)
    qmodel = build_quantized(model, settings, plan, timesteps, init_ranges=False)
    info = quant_info(qmodel)
    info.base_fingerprint, info.base_arch = meta["base_fingerprint"], arch
    info.config, info.source = meta.get("config", {}), str(meta.get("base_source", ""))

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
    if fp_parts is not None:
        _load_fp_parts(qmodel, fp_parts, folder / FP_PARTS_FILE)

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


def _load_fp_parts(qmodel: nn.Module, fp_parts: dict[str, Tensor], path: Path) -> None:
    """Copy the export's non-quantized tensors into ``qmodel``, checking that they fit exactly."""
    own = _fp_parts(qmodel)
    missing, extra = sorted(set(own) - set(fp_parts)), sorted(set(fp_parts) - set(own))
    check(not missing and not extra, f"{str(path)!r} does not fit the model: {len(missing)} tensors missing "
          f"(first: {missing[0] if missing else '-'}), {len(extra)} unexpected (first: {extra[0] if extra else '-'}); "
          "re-export the quantized model")
    for key, t in fp_parts.items():
        check(tuple(t.shape) == tuple(own[key].shape),
              f"{str(path)!r}: tensor {key} has shape {tuple(t.shape)}, the model needs {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, t in fp_parts.items():
            own[key].copy_(t)


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
