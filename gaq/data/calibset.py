"""Calibration sets: ``(x_t, t, cond)`` tuples from the full-precision model's own DDIM trajectories.

The protocol of Q-Diffusion and TFMQ-DM: run DDIM with the FP noise predictor from seeded noise and
keep the model's input at every ``interval``-th sampling step. Kept steps are identified by their
*sampling-step index* ``i`` (0 = the first model call, on pure noise), never by timestep value:
with quadratic spacing at 100 steps the last four steps all have timestep 0.

Which steps are kept (exact): ``i = 0, interval, 2*interval, ...`` while ``i < steps``, i.e.
``range(0, steps, interval)``, which is Q-Diffusion's ``range(0, nsteps, nsteps // cali_st)``.
The CIFAR-10 protocol (100 steps, interval 5) keeps the 20 steps 0, 5, ..., 95.

Conditioning: class-conditional models get labels drawn uniformly from ``num_classes`` by the seed;
text models take their prompts from a prompt list (``prompts``: a text file, one prompt per line, run
through the model folder's tokenizer and text encoder, :mod:`gaq.models.prompts`) or from a safetensors
file of prompt embeddings (``cond`` of shape ``(P, L, D)`` and an optional ``uncond`` of shape ``(L, D)``
or ``(1, L, D)``; SDXL-style models also ``text_embeds``, see :mod:`gaq.models.conditions`), one prompt
drawn uniformly per trajectory. A text model with
class embeddings (``num_class_embeds``) also gets a label per trajectory drawn by the seed; its
unconditional half has the null class, or the same label where the model has no null class. Under classifier-free guidance the model input is the batch ``cat([cond, null])``;
``cond_pairing="cond_uncond"`` keeps both halves (as Q-Diffusion does), ``"cond_only"`` keeps the
first. Unguided sampling has one half, so both settings keep the same tuples.

Storage order: kept steps in sampling order; within a step, the conditional half then the
unconditional half; within a half, trajectories in seed order. Each kept step's tuples are
contiguous. Files are safetensors with the metadata JSON in the header (key ``gaq_meta``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

import gaq
from gaq.atomic import atomic_write
from gaq.provenance import json_digest
from gaq.errors import GaqError, check
from gaq.models.sampling import SamplerConfig, Spacing, ddim_sample
from gaq.models.loading import Denoiser

log = logging.getLogger(__name__)
from gaq.models.prompts import text_conditions, text_encoder_digest

CondPairing = Literal["cond_uncond", "cond_only"]
StorageDtype = Literal["float32", "float16", "bfloat16"]

META_KEY = "gaq_meta"  # safetensors header metadata key holding the JSON meta
FORMAT_VERSION = 1  # bump when the file layout changes
_COND_PREFIX = "cond."
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CalibSetConfig:
    """How to build a calibration set from the FP model's DDIM trajectories.

    Attributes:
        steps: DDIM sampling steps of the trajectories.
        eta: DDIM stochasticity (0 = deterministic).
        spacing: timestep spacing, as in :class:`gaq.models.sampling.SamplerConfig`.
        clip_sample: clip the predicted x0 to [-1, 1] while sampling (the original DDIM / Q-Diffusion
            CIFAR-10 code does not clip; match what your evaluation sampler does).
        steps_offset / set_alpha_to_one: as in :class:`gaq.models.sampling.SamplerConfig` (CompVis'
            LDM sampler: 1 / False).
        interval: keep sampling steps ``0, interval, 2*interval, ...`` (``range(0, steps, interval)``).
        samples_per_step: trajectories sampled; each kept step holds this many tuples per CFG half.
        guidance_scale: classifier-free guidance scale; 1 = no guidance (one model call per step).
        cond_pairing: under guidance, keep both halves of the CFG batch (``cond_uncond``) or only
            the conditional half (``cond_only``).
        seed: seeds the starting noise, the class labels / prompt choice and the eta noise.
        batch_size: trajectories sampled at once (the model sees twice this under guidance).
        dtype: storage dtype of ``x_t`` and of float conditions (sampling runs in the model's dtype).
        classes: the class ids (class models) or prompt rows (text models) of the trajectories,
            cycled: trajectory ``i`` gets ``classes[i % len(classes)]``; None draws them uniformly
            from the seed. TFMQ-DM's ImageNet protocol: the 32 classes 0, 32, ..., 992.
        cond_embeddings: safetensors file of prompt embeddings for ``text`` models (``cond``:
            ``(P, L, D)``, optional ``uncond``: ``(L, D)`` or ``(1, L, D)``; SDXL-style models also
            ``text_embeds`` / ``uncond_text_embeds``, see :mod:`gaq.models.conditions`). Text models
            need exactly one of it and ``prompts``.
        prompts: text file of prompts for ``text`` models, one per line (empty lines skipped), encoded
            with the model folder's own ``tokenizer/`` and ``text_encoder/`` as diffusers'
            ``StableDiffusionPipeline`` does (SDXL-style UNets: also ``tokenizer_2/`` and ``text_encoder_2/``,
            as ``StableDiffusionXLPipeline``; :mod:`gaq.models.prompts`; needs ``pip install 'gaq[text]'``).
    """

    steps: int = 100
    eta: float = 0.0
    spacing: Spacing = "quadratic"
    clip_sample: bool = True
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    interval: int = 5
    samples_per_step: int = 256
    guidance_scale: float = 1.0
    cond_pairing: CondPairing = "cond_uncond"
    seed: int = 0
    batch_size: int = 256
    dtype: StorageDtype = "float32"
    classes: list[int] | None = None
    cond_embeddings: str | None = None
    prompts: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GaqError` (one line) on any value the user must change."""
        check(self.steps >= 1, f"calib.steps must be a positive number of DDIM steps, got {self.steps}")
        check(self.interval >= 1, f"calib.interval must be >= 1 (keep every k-th step), got {self.interval}")
        check(self.interval <= self.steps,
              f"calib.interval ({self.interval}) must not exceed calib.steps ({self.steps}): lower the interval")
        check(self.samples_per_step >= 1, f"calib.samples_per_step must be >= 1, got {self.samples_per_step}")
        check(self.batch_size >= 1, f"calib.batch_size must be >= 1, got {self.batch_size}")
        check(self.eta >= 0, f"calib.eta must be >= 0, got {self.eta}")
        check(self.guidance_scale > 0, f"calib.guidance_scale must be > 0 (1 = no guidance), got {self.guidance_scale}")
        check(self.spacing in ("uniform", "quadratic", "linspace", "trailing"),
              f"calib.spacing must be one of uniform, quadratic, linspace, trailing; got {self.spacing!r}")
        check(self.cond_pairing in ("cond_uncond", "cond_only"),
              f"calib.cond_pairing must be cond_uncond or cond_only, got {self.cond_pairing!r}")
        check(self.dtype in _DTYPES, f"calib.dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        check(self.classes is None or (len(self.classes) > 0 and min(self.classes) >= 0),
              f"calib.classes must be a non-empty list of class ids >= 0 (or null), got {self.classes}")

    @property
    def kept_steps(self) -> Tensor:
        """Sampling-step indices that are kept, ascending: ``range(0, steps, interval)``, LongTensor[S]."""
        return torch.arange(0, self.steps, self.interval, dtype=torch.long)

    @property
    def num_kept_steps(self) -> int:
        """S, the number of kept sampling steps."""
        return len(range(0, self.steps, self.interval))

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(steps=self.steps, eta=self.eta, spacing=self.spacing,
                             guidance_scale=self.guidance_scale, clip_sample=self.clip_sample,
                             steps_offset=self.steps_offset, set_alpha_to_one=self.set_alpha_to_one)


@dataclass
class CalibrationSet:
    """Calibration tuples, each kept step's tuples contiguous and in sampling order.

    Attributes:
        x: model inputs ``x_t``, shape ``(N, C, H, W)``.
        t: timestep of each tuple, LongTensor ``(N,)``.
        step: sampling-step index (0..steps-1) of each tuple, LongTensor ``(N,)``.
        cond: model keyword inputs, each with leading dim N (``class_labels``: LongTensor ``(N,)``;
            ``encoder_hidden_states``: ``(N, L, D)``; nested ones flattened, e.g.
            ``added_cond_kwargs.text_embeds``); empty for unconditional models.
        kept_steps: the kept sampling-step indices, ascending, LongTensor ``(S,)``.
        timesteps: the timestep of each kept step, same order, LongTensor ``(S,)``.
        meta: ``config`` (the :class:`CalibSetConfig` as a dict), ``fingerprint`` and ``source`` of
            the model, ``cond_embeddings_sha256`` (with ``prompts``: ``prompts_sha256`` and
            ``text_encoder_sha256``), ``key`` (the cache key: a hash of config, fingerprint
            and embeddings; stable across regenerations), ``gaq_version``, ``created`` (ISO time) and more.
    """

    x: Tensor
    t: Tensor
    step: Tensor
    cond: dict[str, Tensor]
    kept_steps: Tensor
    timesteps: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        n = self.x.shape[0]
        check(self.t.shape == (n,) and self.step.shape == (n,),
              f"calibration set is inconsistent: x has {n} tuples but t/step have shapes "
              f"{tuple(self.t.shape)}/{tuple(self.step.shape)}; regenerate it")
        check(all(v.shape[0] == n for v in self.cond.values()),
              "calibration set is inconsistent: a condition tensor's leading dim differs from x's; regenerate it")
        check(self.kept_steps.shape == self.timesteps.shape and self.kept_steps.ndim == 1,
              "calibration set is inconsistent: kept_steps and timesteps differ in length; regenerate it")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_kept_steps(self) -> int:
        """S, the number of kept sampling steps."""
        return self.kept_steps.shape[0]

    @property
    def kept_pos(self) -> Tensor:
        """Position (0..S-1) of each tuple's step among the kept steps, LongTensor ``(N,)``."""
        pos = torch.searchsorted(self.kept_steps, self.step).clamp(max=self.num_kept_steps - 1)
        check(bool((self.kept_steps[pos] == self.step).all()),
              "calibration set is inconsistent: a tuple's step is not among kept_steps; regenerate it")
        return pos

    def subset(self, idx: Tensor | list[int]) -> "CalibrationSet":
        """The tuples ``idx`` (in the given order); kept steps, timesteps and meta are unchanged."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return CalibrationSet(
            x=self.x[idx], t=self.t[idx], step=self.step[idx], cond={k: v[idx] for k, v in self.cond.items()},
            kept_steps=self.kept_steps.clone(), timesteps=self.timesteps.clone(), meta=dict(self.meta),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file atomically (temp file in the same folder, then ``os.replace``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"x": self.x, "t": self.t, "step": self.step, "kept_steps": self.kept_steps, "timesteps": self.timesteps}
        tensors.update({_COND_PREFIX + k: v for k, v in self.cond.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = dict(self.meta, format_version=FORMAT_VERSION)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                                        metadata={META_KEY: json.dumps(meta, sort_keys=True)}))

    @classmethod
    def load(cls, path: str | os.PathLike, expect_meta: Mapping[str, Any] | None = None) -> "CalibrationSet":
        """Read a file written by :meth:`save`.

        Args:
            path: the safetensors file.
            expect_meta: entries the stored meta must equal (e.g. ``config``, ``fingerprint``); nested
                dicts are compared key by key. A mismatch raises :class:`GaqError` naming what differs.
        """
        from safetensors import safe_open

        path = Path(path)
        check(path.is_file(), f"calibration set file {path} does not exist: run `gaq calib-data` to generate it")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(header[META_KEY])
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise GaqError(f"calibration set file {path} is unreadable or truncated ({type(err).__name__}: "
                           f"{str(err)[:120]}); delete it and rerun `gaq calib-data`") from None
        missing = {"x", "t", "step", "kept_steps", "timesteps"} - tensors.keys()
        check(not missing, f"calibration set file {path} lacks tensors {sorted(missing)}; delete it and rerun `gaq calib-data`")
        check(meta.get("format_version") == FORMAT_VERSION,
              f"calibration set file {path} has format version {meta.get('format_version')}, this gaq reads "
              f"{FORMAT_VERSION}; delete it and rerun `gaq calib-data`")
        if expect_meta is not None:
            diffs = meta_differences(meta, expect_meta)
            check(not diffs, f"calibration set file {path} does not match the requested set "
                             f"({'; '.join(diffs[:6])}); delete it, or rerun `gaq calib-data` with this config to regenerate")
        cond = {k[len(_COND_PREFIX):]: v for k, v in tensors.items() if k.startswith(_COND_PREFIX)}
        return cls(x=tensors["x"], t=tensors["t"], step=tensors["step"], cond=cond,
                   kept_steps=tensors["kept_steps"], timesteps=tensors["timesteps"], meta=meta)


def meta_differences(stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``key: stored -> expected`` lines for every expected entry that differs."""
    diffs = []
    for key, want in expected.items():
        name = f"{prefix}{key}"
        have = stored.get(key, "<missing>")
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            diffs += meta_differences(have, want, prefix=name + ".")
        elif _jsonable(have) != _jsonable(want):
            diffs.append(f"{name}: file has {have!r}, wanted {want!r}")
    return diffs


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_meta(den: Denoiser, cfg: CalibSetConfig) -> dict[str, Any]:
    """The meta entries that identify a calibration set: config, model fingerprint, embeddings hash; with a
    prompt list also its hash and that of the model folder's tokenizer and text encoder files."""
    emb = cfg.cond_embeddings
    config = _jsonable(asdict(cfg))
    if cfg.prompts is None:  # the keys of sets made before prompt lists existed stay the same
        del config["prompts"]
    meta = {
        "config": config,
        "fingerprint": den.fingerprint,
        "cond_embeddings_sha256": file_sha256(emb) if emb and os.path.isfile(emb) else None,
    }
    if cfg.prompts is not None:
        meta["prompts_sha256"] = file_sha256(cfg.prompts) if os.path.isfile(cfg.prompts) else None
        meta["text_encoder_sha256"] = text_encoder_digest(den.source)
    return meta


def cache_key(den: Denoiser, cfg: CalibSetConfig) -> str:
    """16 hex digits identifying (config, model fingerprint, embeddings or prompt file content)."""
    return json_digest(expected_meta(den, cfg))


def cache_path(den: Denoiser, cfg: CalibSetConfig, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`load_or_generate` keeps the set for this model and config."""
    return Path(cache_dir) / f"calib-{den.fingerprint}-{cache_key(den, cfg)}.safetensors"


def _conditions(den: Denoiser, cfg: CalibSetConfig, n: int, gen: torch.Generator
                ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Per-trajectory conditions and null conditions (leading dim n, on CPU; the null ones or None)."""
    if den.cond_kind == "none":
        check(cfg.cond_embeddings is None, "calib.cond_embeddings is set but the model is unconditional: remove it")
        check(cfg.prompts is None, "calib.prompts is set but the model is unconditional: remove it")
        check(not cfg.guided, "calib.guidance_scale must be 1 for an unconditional model")
        return {}, None
    if den.cond_kind == "class":
        check(den.num_classes is not None and den.num_classes >= 1,
              "the class-conditional model has no num_classes; set it on the Denoiser")
        check(cfg.cond_embeddings is None, "calib.cond_embeddings is for text models; remove it for a class model")
        check(cfg.prompts is None, "calib.prompts is for text models; remove it for a class model")
        labels = _pick(cfg, den.num_classes, n, gen, "class")
        null = None
        if den.null_label is not None:
            null = {"class_labels": torch.full((n,), den.null_label, dtype=torch.long)}
        check(not cfg.guided or null is not None,
              "calib.guidance_scale != 1 needs a null class but the model has none: set guidance_scale: 1")
        return {"class_labels": labels}, null
    if den.cond_kind == "text":
        table = text_conditions(den, cfg.prompts, cfg.cond_embeddings, "calib.")
        check(not cfg.guided or table.uncond is not None,
              f"calib.guidance_scale != 1 needs an 'uncond' tensor in {cfg.cond_embeddings}: add it or set guidance_scale: 1")
        cond = table.rows(_pick(cfg, table.num_prompts, n, gen, "prompt"))
        null = table.uncond_rows(n)
        if den.num_classes is not None:  # a text model with class embeddings: labels drawn by the seed
            cond["class_labels"] = torch.randint(den.num_classes, (n,), generator=gen)
            if null is not None:  # the null class if the model has one, else the same label in both halves
                null["class_labels"] = (cond["class_labels"] if den.null_label is None
                                        else torch.full((n,), den.null_label, dtype=torch.long))
        return cond, null
    raise GaqError(f"unknown cond_kind {den.cond_kind!r} on the Denoiser; use none, class or text")


def _pick(cfg: CalibSetConfig, count: int, n: int, gen: torch.Generator, what: str) -> Tensor:
    """Class ids / prompt rows of ``n`` trajectories: ``cfg.classes`` cycled, or uniform draws from ``gen``."""
    if cfg.classes is None:
        return torch.randint(count, (n,), generator=gen)
    check(max(cfg.classes) < count, f"calib.classes holds {what} {max(cfg.classes)} but the model has {count}: "
          f"use ids below {count}")
    return torch.tensor(cfg.classes, dtype=torch.long).repeat(-(-n // len(cfg.classes)))[:n]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def generate_calibration_set(den: Denoiser, cfg: CalibSetConfig, device: torch.device | str | None = None,
                             progress: bool = True) -> CalibrationSet:
    """Sample DDIM trajectories with the FP model and keep the model input at the kept steps.

    Args:
        den: the FP noise predictor and its schedule.
        cfg: the protocol (steps, spacing, interval, samples, guidance, seed ...).
        device: where to sample; None = where the model already is. The model is moved there for
            the duration and moved back afterwards.
        progress: show a rich progress bar.

    Returns:
        A :class:`CalibrationSet` of ``S * halves * samples_per_step`` tuples, where ``halves`` is 2
        under guidance with ``cond_pairing="cond_uncond"`` and 1 otherwise.
    """
    cfg.validate()
    model = den.model
    home, model_dtype = _model_device_dtype(model)
    device = home if device is None else torch.device(device)
    store_dtype = _DTYPES[cfg.dtype]
    n, S = cfg.samples_per_step, cfg.num_kept_steps
    kept = cfg.kept_steps
    timesteps_all = cfg.sampler_config().timesteps(len(den.alphas_cumprod))
    halves = 2 if (cfg.guided and cfg.cond_pairing == "cond_uncond") else 1

    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((n, *den.sample_shape), generator=gen, dtype=torch.float32)
    cond, null = _conditions(den, cfg, n, gen)
    eta_gen = torch.Generator().manual_seed(cfg.seed + 1)

    keep_pos = {int(s): i for i, s in enumerate(kept.tolist())}
    xs = torch.empty((S, halves, n, *den.sample_shape), dtype=store_dtype)
    conds: dict[str, Tensor] = {}
    for k, v in cond.items():
        conds[k] = torch.empty((S, halves, n, *v.shape[1:]), dtype=store_dtype if v.is_floating_point() else v.dtype)
    seen = torch.zeros(S, dtype=torch.long)

    batches = [(b0, min(b0 + cfg.batch_size, n)) for b0 in range(0, n, cfg.batch_size)]
    bar = Progress(TextColumn("[bold]calibration set"), BarColumn(), MofNCompleteColumn(), TextColumn("model calls"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress, transient=False)
    model.to(device)
    try:
        with bar:
            task = bar.add_task("sampling", total=len(batches) * cfg.steps)
            for b0, b1 in batches:
                bs = b1 - b0

                def on_step(i: int, t_in: Tensor, x_in: Tensor, c_in: Mapping[str, Tensor], b0=b0, b1=b1, bs=bs):
                    bar.advance(task)
                    pos = keep_pos.get(i)
                    if pos is None:
                        return
                    for h in range(halves):
                        xs[pos, h, b0:b1] = x_in[h * bs:(h + 1) * bs].to("cpu", store_dtype)
                        for k in conds:
                            conds[k][pos, h, b0:b1] = c_in[k][h * bs:(h + 1) * bs].to("cpu", conds[k].dtype)
                    seen[pos] += bs

                c_b = {k: _to_model(v[b0:b1], device, model_dtype) for k, v in cond.items()}
                null_b = None if null is None else {k: _to_model(v[b0:b1], device, model_dtype) for k, v in null.items()}
                ddim_sample(model, den.alphas_cumprod, noise[b0:b1].to(device, model_dtype), cfg.sampler_config(),
                            cond=c_b, null_cond=null_b if cfg.guided else None, generator=eta_gen, on_step=on_step)
    finally:
        model.to(home)
    assert bool((seen == n).all()), "every kept step must have been visited once per trajectory"
    finite = torch.isfinite(xs.flatten(3)).all(-1)  # (S, halves, n): each tuple's x_t
    if not bool(finite.all()):
        raise GaqError(f"the FP model's trajectories turned non-finite (NaN or Inf) in {int((~finite).sum())} of "
                       f"{finite.numel()} calibration tuples, first at kept step {int(kept[torch.nonzero(~finite)[0, 0]])}: "
                       f"the model {den.source} or its noise schedule is broken (check its weights and scheduler; "
                       "the set is not cached)")

    step = kept.repeat_interleave(halves * n)
    t = timesteps_all[kept].repeat_interleave(halves * n)
    meta = dict(expected_meta(den, cfg), key=cache_key(den, cfg), source=den.source, gaq_version=gaq.__version__,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), sample_shape=list(den.sample_shape),
                cond_kind=den.cond_kind, num_train_timesteps=len(den.alphas_cumprod), halves=halves,
                kept_steps=kept.tolist())
    return CalibrationSet(
        x=xs.reshape(S * halves * n, *den.sample_shape), t=t, step=step,
        cond={k: v.reshape(S * halves * n, *v.shape[3:]) for k, v in conds.items()},
        kept_steps=kept.clone(), timesteps=timesteps_all[kept].clone(), meta=meta,
    )


def _to_model(v: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return v.to(device, dtype) if v.is_floating_point() else v.to(device)


def load_or_generate(den: Denoiser, cfg: CalibSetConfig, cache_dir: str | os.PathLike,
                     device: torch.device | str | None = None, progress: bool = True
                     ) -> tuple[CalibrationSet, Path, bool]:
    """Reuse the cached set for (config, model) or generate and cache it.

    The file name is ``calib-<fingerprint>-<key>.safetensors`` in ``cache_dir``, where ``key`` hashes
    the whole config, the model fingerprint and the embeddings or prompt file content, so a different config
    goes to a different file. Returns ``(set, path, reused)``.
    """
    cfg.validate()
    path = cache_path(den, cfg, cache_dir)
    if path.is_file():
        try:
            return CalibrationSet.load(path, expect_meta=expected_meta(den, cfg)), path, True
        except GaqError as err:  # a stale, foreign or damaged file under this set's name: make the set again
            log.warning("%s; it is regenerated", err)
    cs = generate_calibration_set(den, cfg, device=device, progress=progress)
    cs.save(path)
    return cs, path, False
