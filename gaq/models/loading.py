"""Loading a noise predictor and its noise schedule from a diffusers hub id or a local folder.

A *source* is what a user writes in a config: a local folder in diffusers' pipeline layout
(``model_index.json`` + ``unet/`` or ``transformer/`` + ``scheduler/``; without ``model_index.json``
the one model subfolder with a ``config.json`` is taken, and a ``vae/`` or ``vqvae/`` beside it), a folder holding one
model (``config.json`` + weights) and a ``scheduler/`` folder, or a hub id such as
``google/ddpm-cifar10-32``. The shipped default is ``checkpoints/default``. A latent diffusion
pipeline's autoencoder (``vqvae/`` or ``vae/``) is loaded too, as the :class:`Denoiser`'s
``decoder`` (:mod:`gaq.models.latent`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

import diffusers
import torch
from diffusers import (DiTTransformer2DModel, PixArtTransformer2DModel, SchedulerMixin, Transformer2DModel,
                       UNet2DConditionModel, UNet2DModel)
from diffusers.models.embeddings import LabelEmbedding
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor, nn

from gaq.atomic import apply_umask
from gaq.errors import GaqError, check
from gaq.models.latent import AUTOENCODER_CLASSES, AUTOENCODER_COMPONENTS, SCALING_FACTOR_KEY, LatentDecoder

CondKind = Literal["none", "class", "text"]


@dataclass
class Denoiser:
    """A noise predictor with what sampling and calibration need to know about it.

    Attributes:
        model: the diffusers noise predictor (UNet2DModel, UNet2DConditionModel, DiT, PixArt), in eval mode.
        alphas_cumprod: the training noise schedule, shape ``(num_train_timesteps,)``.
        sample_shape: ``(C, H, W)`` of one sample the model denoises.
        cond_kind: ``none``, ``class`` (``class_labels``) or ``text`` (``encoder_hidden_states``).
        num_classes: number of real classes for ``class`` models (and for ``text`` models with class
            embeddings, which take ``class_labels`` too). The null (unconditional) label of
            classifier-free guidance is ``num_classes`` when the model has one more class embedding
            than real classes, else None (the model has no null class).
        null_label: the null class id, or None.
        source: where it came from (folder or hub id), for metadata.
        fingerprint: a short hash of the model's config and weights, used to key caches.
        decoder: for latent diffusion models, the autoencoder that turns sampled latents into
            images (``sample_shape`` is then the latent's shape); None for pixel-space models.
    """

    model: nn.Module
    alphas_cumprod: Tensor
    sample_shape: tuple[int, int, int]
    cond_kind: CondKind = "none"
    num_classes: int | None = None
    null_label: int | None = None
    source: str = "<in-memory>"
    fingerprint: str = field(default="")
    decoder: LatentDecoder | None = None

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = model_fingerprint(self.model)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one generated image: ``sample_shape``, or the decoded latent's shape."""
        return self.sample_shape if self.decoder is None else self.decoder.image_shape(self.sample_shape)


def model_fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit hash of a model's config (if any) and all its parameters and buffers.

    diffusers' private config keys (``_name_or_path``, ``_diffusers_version``, ...) are left out, so a
    model hashes the same in memory and after a save/load round trip from any path.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Supported noise predictors: a registry keyed by class.
# --------------------------------------------------------------------------------------------

# gaq writes this file into every model folder it saves: {"num_classes": 10, "null_label": 10}, plus
# {"latent_scaling_factor": ...} for latent models (see gaq.models.latent).
GAQ_META_FILE = "gaq.json"
# Set to 1 to let a hub id that is not in the local cache be downloaded.
ALLOW_DOWNLOADS_ENV = "GAQ_ALLOW_DOWNLOADS"


@dataclass(frozen=True)
class CondInfo:
    """What a model's class/text conditioning looks like, read off the built model.

    Attributes:
        kind: ``none``, ``class`` or ``text``.
        num_classes: real classes (class models), or None.
        null_label: the classifier-free-guidance null class id, or None.
        num_embeddings: rows of the class-embedding table (bounds every label id), or None.
    """

    kind: CondKind = "none"
    num_classes: int | None = None
    null_label: int | None = None
    num_embeddings: int | None = None


def _unet_cond(model: nn.Module) -> CondInfo:
    """``UNet2DModel``: class-conditional through ``num_class_embeds`` or a ``class_embed_type``.

    Without gaq.json every class embedding is taken as a real class (no null label).
    """
    cfg = model.config
    if cfg.get("num_class_embeds") is not None:
        n = int(cfg["num_class_embeds"])
        return CondInfo("class", n, None, n)
    if cfg.get("class_embed_type") is not None:
        return CondInfo("class")
    return CondInfo()


def _cond_unet_cond(model: nn.Module) -> CondInfo:
    """``UNet2DConditionModel``: always needs ``encoder_hidden_states`` (text embeddings).

    With ``num_class_embeds`` it also takes ``class_labels`` (every class embedding a real class unless
    gaq.json names a null label); with ``addition_embed_type="text_time"`` (SDXL) also
    ``added_cond_kwargs`` (:mod:`gaq.models.conditions`). Other class or addition embeddings are refused.
    """
    cfg = model.config
    check(cfg.get("class_embed_type") is None,
          f"UNet2DConditionModel with class_embed_type={cfg.get('class_embed_type')!r} is not supported; gaq takes "
          "class labels through num_class_embeds")
    check(cfg.get("addition_embed_type") in (None, "text_time"),
          f"UNet2DConditionModel with addition_embed_type={cfg.get('addition_embed_type')!r} is not supported; "
          "gaq supports none or text_time (SDXL)")
    check(not cfg.get("class_embeddings_concat"),
          "UNet2DConditionModel with class_embeddings_concat is not supported; gaq needs the class embedding added")
    n = cfg.get("num_class_embeds")
    return CondInfo("text") if n is None else CondInfo("text", int(n), None, int(n))


def _transformer_cond(model: nn.Module) -> CondInfo:
    """DiT-style transformers: classes come from the ``LabelEmbedding`` inside AdaLN-Zero.

    diffusers' ``LabelEmbedding`` holds ``num_classes`` real classes plus one extra row (id
    ``num_classes``) when it was trained with label dropout: that row is the null label (DiT-XL-2:
    1000 classes, 1001 rows, null label 1000).
    """
    labels = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    if labels:
        emb = labels[0]
        rows = emb.embedding_table.num_embeddings
        return CondInfo("class", int(emb.num_classes), emb.num_classes if rows > emb.num_classes else None, rows)
    if model.config.get("cross_attention_dim") is not None:
        return CondInfo("text")
    return CondInfo()


def _pixart_cond(model: nn.Module) -> CondInfo:
    """``PixArtTransformer2DModel``: text embeddings (``caption_channels`` wide) through ``encoder_hidden_states``."""
    return CondInfo("text")


@dataclass(frozen=True)
class ModelKind:
    """How gaq loads, describes and saves one diffusers noise-predictor class.

    Attributes:
        component: the key of the model in a pipeline's ``model_index.json`` (``unet`` / ``transformer``).
        cond: reads the model's :class:`CondInfo` off a built model.
        pipeline: the diffusers pipeline class written into ``model_index.json`` by :func:`save_denoiser`.
    """

    component: str
    cond: Callable[[nn.Module], CondInfo]
    pipeline: str = "DiffusionPipeline"


MODEL_KINDS: dict[type[nn.Module], ModelKind] = {
    UNet2DModel: ModelKind("unet", _unet_cond, pipeline="DDPMPipeline"),
    UNet2DConditionModel: ModelKind("unet", _cond_unet_cond),
    DiTTransformer2DModel: ModelKind("transformer", _transformer_cond, pipeline="DiTPipeline"),
    Transformer2DModel: ModelKind("transformer", _transformer_cond),
    PixArtTransformer2DModel: ModelKind("transformer", _pixart_cond, pipeline="PixArtAlphaPipeline"),
}
# ``_class_name`` in a config.json -> class. (diffusers itself turns an AdaLN-Zero ``Transformer2DModel``
# config into a ``DiTTransformer2DModel`` when loading.)
MODEL_CLASSES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in MODEL_KINDS}
PIPELINE_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(k.component for k in MODEL_KINDS.values()))


def model_kind(model: nn.Module) -> ModelKind:
    """The registry entry of ``model``'s class (or of its nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls in MODEL_KINDS:
            return MODEL_KINDS[cls]
    raise GaqError(f"unsupported model class {type(model).__name__}; supported: {', '.join(MODEL_CLASSES)}")


# --------------------------------------------------------------------------------------------
# Where the files are: a local folder or a hub repository.
# --------------------------------------------------------------------------------------------


def downloads_allowed() -> bool:
    """Whether a hub id may be downloaded (``GAQ_ALLOW_DOWNLOADS=1``); otherwise only the local cache is read."""
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "") == "1"


def _looks_local(source: str) -> bool:
    """A path, not a hub id: absolute, relative with ./ ~ .., more than one '/', or its first part exists here."""
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
        return True
    return "/" in source and Path(source.split("/")[0]).is_dir()


@dataclass(frozen=True)
class _Source:
    """Where the files of a model are: a local folder (``local``), or a hub repository (downloads on)."""

    ref: str
    local: bool

    def exists(self, filename: str, subfolder: str | None = None) -> bool:
        return self.read_json(filename, subfolder) is not None

    def read_json(self, filename: str, subfolder: str | None = None) -> dict | None:
        """The parsed JSON file, or None when it does not exist (or, for a hub id, cannot be had)."""
        if self.local:
            path = Path(self.ref, subfolder or "", filename)
            return json.loads(path.read_text()) if path.is_file() else None
        try:
            path = hf_hub_download(self.ref, filename, subfolder=subfolder)
        except (OSError, ValueError, EntryNotFoundError):
            return None
        return json.loads(Path(path).read_text())


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local hub-cache snapshot folder of ``repo_id`` (revision ``main``), or None if it is not cached.

    Reads the cache's files only: unlike ``from_pretrained(..., local_files_only=True)``, whose header
    building may still contact the hub, this touches no network at all.
    """
    for filename in ("model_index.json", "config.json"):
        try:
            path = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(path, str):
            return Path(path).parent
    return None


def _resolve_source(ref: str) -> _Source:
    """A local folder, a cached hub snapshot (downloads off), or a hub id to download (downloads on)."""
    path = os.path.expanduser(ref)
    if os.path.isdir(path):
        return _Source(path, local=True)
    if _looks_local(ref) or os.path.exists(path):
        raise GaqError(f"model folder '{ref}' does not exist (or is not a folder); give a diffusers model folder or a hub id")
    if downloads_allowed():
        return _Source(ref, local=False)
    snapshot = _cached_snapshot(ref)
    if snapshot is None:
        raise _hub_error(ref)
    return _Source(str(snapshot), local=True)


def _hub_error(source: str) -> GaqError:
    if downloads_allowed():
        return GaqError(
            f"cannot load model '{source}': not a local folder, and the hub could not be reached or has no such "
            "diffusers model (HF_HUB_OFFLINE set, no network, or a wrong id); give a local folder with "
            "save_pretrained layout"
        )
    return GaqError(
        f"cannot load model '{source}': not a local folder and not in the local hub cache (downloads are off); "
        f"give a local folder with save_pretrained layout, or set {ALLOW_DOWNLOADS_ENV}=1 on a machine with network"
    )


@dataclass(frozen=True)
class _Layout:
    """Where the model and the scheduler live inside a source (subfolders; None = the root)."""

    class_name: str
    model_subfolder: str | None
    scheduler_subfolder: str | None


def _find_layout(src: _Source) -> _Layout:
    index = src.read_json("model_index.json")
    if index is not None:
        present = [c for c in PIPELINE_COMPONENTS if isinstance(index.get(c), list) and index[c][1] is not None]
        check(bool(present), f"'{src.ref}': model_index.json names no {' or '.join(PIPELINE_COMPONENTS)} component")
        check("scheduler" in index, f"'{src.ref}': model_index.json names no scheduler; add a scheduler/ folder")
        return _Layout(index[present[0]][1], present[0], "scheduler")
    config = src.read_json("config.json")
    if config is None and src.local:
        bare = _bare_pipeline_layout(src)
        if bare is not None:
            return bare
    if config is None:
        if not src.local:
            raise _hub_error(src.ref)
        raise GaqError(
            f"model folder '{src.ref}' has neither model_index.json (pipeline layout) nor config.json (one model), "
            f"nor a {' or '.join(c + '/' for c in PIPELINE_COMPONENTS)} subfolder with a config.json; "
            "save the model with save_pretrained"
        )
    check("_class_name" in config, f"'{src.ref}/config.json' has no _class_name; save the model with save_pretrained")
    scheduler_sub = "scheduler" if src.exists("scheduler_config.json", "scheduler") else None
    return _Layout(config["_class_name"], None, scheduler_sub)


def _bare_pipeline_layout(src: _Source) -> _Layout | None:
    """A pipeline folder without model_index.json: one ``unet/`` or ``transformer/`` with a config.json.

    The scheduler must then be in ``scheduler/``; a missing one is named (None: no such subfolder).
    """
    found = [(c, src.read_json("config.json", c)) for c in PIPELINE_COMPONENTS]
    found = [(c, cfg) for c, cfg in found if cfg is not None]
    if not found:
        return None
    check(len(found) == 1, f"'{src.ref}' has both {' and '.join(c + '/' for c, _ in found)} but no model_index.json; "
                           "keep one, or add a model_index.json naming the noise predictor")
    component, config = found[0]
    check("_class_name" in config,
          f"'{src.ref}/{component}/config.json' has no _class_name; save the model with save_pretrained")
    check(src.exists("scheduler_config.json", "scheduler"),
          f"'{src.ref}' has {component}/ but no scheduler/scheduler_config.json; save the noise scheduler there "
          "(scheduler.save_pretrained)")
    return _Layout(config["_class_name"], component, "scheduler")


def _load_alphas_cumprod(src: _Source, subfolder: str | None) -> Tensor:
    """The cumulative alphas of the source's diffusers scheduler (any scheduler defined by betas)."""
    config = src.read_json("scheduler_config.json", subfolder)
    where = f"{src.ref}/{subfolder}" if subfolder else src.ref
    check(config is not None, f"no scheduler_config.json in '{where}'; save the noise scheduler next to the model")
    name = config.get("_class_name", "DDPMScheduler")
    scheduler_cls = getattr(diffusers, name, None)
    check(
        isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin),
        f"'{where}/scheduler_config.json' names {name!r}, which is not a diffusers scheduler",
    )
    scheduler = scheduler_cls.from_config(config)
    acp = getattr(scheduler, "alphas_cumprod", None)
    check(
        isinstance(acp, Tensor),
        f"scheduler {name} of '{src.ref}' has no betas/alphas_cumprod (flow matching?); gaq needs a DDPM-style noise schedule",
    )
    return acp.detach().to(torch.float32).clone()


def _sample_shape(config: Mapping, source: str) -> tuple[int, int, int]:
    size = config.get("sample_size")
    check(size is not None, f"model config of '{source}' has no sample_size; gaq needs image-shaped models")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config["in_channels"]), int(h), int(w)


def _read_meta(src: _Source, cond: CondInfo) -> CondInfo:
    """Apply gaq.json's ``num_classes`` / ``null_label`` (written by :func:`save_denoiser`) to the inferred ones."""
    meta = src.read_json(GAQ_META_FILE)
    if meta is None or cond.num_classes is None and cond.kind != "class":
        return cond
    num_classes = int(meta.get("num_classes") or cond.num_classes)
    null_label = meta.get("null_label", cond.null_label)
    null_label = None if null_label is None else int(null_label)
    rows = cond.num_embeddings
    if rows is not None:
        check(
            num_classes <= rows and (null_label is None or 0 <= null_label < rows),
            f"'{src.ref}/{GAQ_META_FILE}' does not fit the model ({rows} class embeddings); fix or delete it",
        )
    return CondInfo(cond.kind, num_classes, null_label, rows)


def _load_decoder(src: _Source, torch_dtype: torch.dtype | None) -> LatentDecoder | None:
    """The pipeline's autoencoder (``vqvae`` or ``vae`` in model_index.json) as a decoder, or None if it has none."""
    index = src.read_json("model_index.json")
    if index is None and src.local:  # a bare pipeline folder: the autoencoder's own config names its class
        index = {k: [None, cfg.get("_class_name")] for k in dict.fromkeys(AUTOENCODER_COMPONENTS.values())
                 if (cfg := src.read_json("config.json", k)) is not None}
    keys = [k for k in dict.fromkeys(AUTOENCODER_COMPONENTS.values())
            if index is not None and isinstance(index.get(k), list) and index[k][1] is not None]
    if not keys:
        return None
    key, class_name = keys[0], index[keys[0]][1]
    cls = AUTOENCODER_CLASSES.get(class_name)
    check(cls is not None, f"'{src.ref}': the {key} component is a {class_name}; gaq decodes latents with "
                           f"{', '.join(AUTOENCODER_CLASSES)}")
    autoencoder = cls.from_pretrained(src.ref, subfolder=key, torch_dtype=torch_dtype, low_cpu_mem_usage=False)
    meta = src.read_json(GAQ_META_FILE) or {}
    return LatentDecoder(autoencoder, float(meta.get(SCALING_FACTOR_KEY, autoencoder.config.scaling_factor)))


def load_denoiser(source: str | os.PathLike, *, torch_dtype: torch.dtype | None = None) -> Denoiser:
    """Load a noise predictor and its noise schedule from a local folder or a hub id.

    Args:
        source: a local folder in diffusers pipeline layout (``model_index.json`` naming ``unet`` or
            ``transformer``, plus ``scheduler/``; or just ``unet/`` / ``transformer/`` and ``scheduler/``,
            without ``model_index.json``), a folder holding one model (``config.json`` with
            ``_class_name``) with ``scheduler/`` or ``scheduler_config.json`` beside it, or a hub id.
            A hub id is read from the local hub cache (no network) unless ``GAQ_ALLOW_DOWNLOADS=1``,
            in which case diffusers' ``from_pretrained(id, subfolder=...)`` may download it.
        torch_dtype: dtype to load the weights in (default: as stored).

    Returns:
        The :class:`Denoiser`, model in eval mode on the CPU; for a pipeline with a ``vqvae`` /
        ``vae`` component, with that autoencoder as its ``decoder``.

    Raises:
        GaqError: missing folder, unsupported class, no scheduler, or a hub id that cannot be had.
    """
    ref = os.fspath(source)
    src = _resolve_source(ref)
    layout = _find_layout(src)
    cls = MODEL_CLASSES.get(layout.class_name)
    check(cls is not None, f"'{ref}' holds a {layout.class_name}; gaq supports {', '.join(MODEL_CLASSES)}")
    try:
        model = cls.from_pretrained(
            src.ref, subfolder=layout.model_subfolder, torch_dtype=torch_dtype,
            low_cpu_mem_usage=False,
        )
        alphas_cumprod = _load_alphas_cumprod(src, layout.scheduler_subfolder)
        decoder = _load_decoder(src, torch_dtype)
    except (OSError, EntryNotFoundError) as err:
        if src.local:
            raise GaqError(f"cannot load model '{ref}': {err}".splitlines()[0]) from err
        raise _hub_error(ref) from err
    model.eval()
    cond = _read_meta(src, model_kind(model).cond(model))
    return Denoiser(
        model=model,
        alphas_cumprod=alphas_cumprod,
        sample_shape=_sample_shape(model.config, ref),
        cond_kind=cond.kind,
        num_classes=cond.num_classes,
        null_label=cond.null_label,
        source=ref,
        decoder=decoder,
    )


def save_denoiser(den: Denoiser, folder: str | os.PathLike, scheduler: SchedulerMixin) -> Path:
    """Write ``den`` in diffusers pipeline layout so that :func:`load_denoiser` (and diffusers) read it back.

    Layout: ``model_index.json``, ``unet/`` or ``transformer/`` (config + safetensors weights),
    ``scheduler/scheduler_config.json``, the decoder's autoencoder in ``vqvae/`` or ``vae/`` (latent
    models) and ``gaq.json`` (``num_classes``, ``null_label``, ``latent_scaling_factor``).

    Args:
        den: the model and its metadata.
        folder: output folder (created; existing files are overwritten).
        scheduler: the diffusers scheduler the model was trained with; its ``alphas_cumprod`` must
            equal ``den.alphas_cumprod``.
    """
    kind = model_kind(den.model)
    acp = getattr(scheduler, "alphas_cumprod", None)
    check(
        isinstance(acp, Tensor) and acp.shape == den.alphas_cumprod.shape
        and torch.allclose(acp.float(), den.alphas_cumprod.float().cpu(), rtol=1e-5, atol=1e-7),
        "save_denoiser: the scheduler's alphas_cumprod differ from the Denoiser's; pass the scheduler the model was trained with",
    )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    den.model.save_pretrained(out / kind.component, safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": kind.pipeline,
        "_diffusers_version": diffusers.__version__,
        kind.component: ["diffusers", type(den.model).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    meta = {"num_classes": den.num_classes, "null_label": den.null_label}
    if den.decoder is not None:
        den.decoder.autoencoder.save_pretrained(out / den.decoder.component, safe_serialization=True)
        index[den.decoder.component] = ["diffusers", type(den.decoder.autoencoder).__name__]
        meta[SCALING_FACTOR_KEY] = den.decoder.scaling_factor
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / GAQ_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    apply_umask(out)
    return out
