"""Prompt lists: prompts of a text file run through the pipeline folder's own tokenizer and text encoder.

A text model takes its prompts one of two ways (exactly one per job):

- ``prompts``: a UTF-8 text file, one prompt per line (empty lines skipped, each line stripped; e.g.
  COCO captions as Q-Diffusion uses). gaq loads the model folder's ``tokenizer/`` and ``text_encoder/``
  (the classes its ``model_index.json`` names; ``AutoTokenizer`` / ``CLIPTextModel`` without one) and
  encodes as diffusers' ``StableDiffusionPipeline.encode_prompt`` does: every prompt padded (and
  truncated) to the tokenizer's ``model_max_length``, the attention mask passed only when the text
  encoder's config sets ``use_attention_mask``, the last hidden state kept (``cond``, ``(P, L, D)``), and
  the empty prompt padded the same way as the unconditional row (``uncond``). An SDXL-style UNet
  (``addition_embed_type="text_time"``) also takes ``tokenizer_2/`` and ``text_encoder_2/`` and is encoded
  as ``StableDiffusionXLPipeline.encode_prompt`` does (both encoders' penultimate hidden states side by
  side, the pooled projection of the second as ``text_embeds``, a zero unconditional row under the
  pipeline's ``force_zeros_for_empty_prompt``; the size conditioning is the default of
  :mod:`gaq.models.conditions`). Needs ``transformers`` (``pip install 'gaq[text]'``); it is imported
  only here, when a prompt list is given.
- ``cond_embeddings``: a safetensors file of ready-made embeddings (:mod:`gaq.models.conditions`).

Both end in the same :func:`gaq.models.conditions.prompt_table`. PixArt (a T5 encoder whose attention
mask its transformer takes) is refused for prompt lists with one line: give it the embeddings file.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from gaq.errors import GaqError, check
from gaq.models.conditions import PromptTable, load_prompt_table, prompt_table, text_time_width

TEXT_EXTRA = "pip install 'gaq[text]'"
TOKENIZER_DIR, TEXT_ENCODER_DIR = "tokenizer", "text_encoder"
PAIRS = ((TOKENIZER_DIR, TEXT_ENCODER_DIR), ("tokenizer_2", "text_encoder_2"))  # SDXL has both
ENCODE_BATCH = 64  # prompts per text-encoder call

_TABLES: dict[tuple, PromptTable] = {}  # encoded prompt lists of this process, by (folder, file, encoder) content
_DIGESTS: dict[tuple, str] = {}  # folder digests by the files' (path, size, mtime)


def read_prompt_list(path: str | os.PathLike, setting: str) -> list[str]:
    """The prompts of a text file, one per line (stripped; empty lines skipped)."""
    check(os.path.isfile(path), f"{setting} file {path} does not exist; point it to a text file with one prompt per line")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GaqError(f"{setting} file {path} is not UTF-8 text; give a text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    check(bool(prompts), f"{setting} file {path} holds no prompts; write one prompt per line")
    return prompts


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _transformers(setting: str):
    try:
        import transformers
    except ImportError:
        raise GaqError(f"{setting} needs the transformers package to run the pipeline's text encoder: "
                       f"{TEXT_EXTRA}") from None
    return transformers


def _text_folder(source: str, setting: str, embeddings_setting: str, sdxl: bool):
    """The resolved model source and its model_index.json, after checking that it has the tokenizer(s) and
    text encoder(s) to run: ``tokenizer/`` + ``text_encoder/``, and for SDXL also the ``_2`` pair."""
    from gaq.models.loading import _resolve_source

    check(source and source != "<in-memory>",
          f"{setting} needs the model's pipeline folder (its {TOKENIZER_DIR}/ and {TEXT_ENCODER_DIR}/), but this "
          f"model was built in memory: load it with load_denoiser(folder), or give {embeddings_setting} instead")
    src = _resolve_source(source)
    index = src.read_json("model_index.json") or {}
    for pair in PAIRS[:2 if sdxl else 1]:
        for sub, files in ((pair[1], ("config.json",)), (pair[0], ("tokenizer_config.json", "tokenizer.json", "vocab.json"))):
            need = " and ".join(f"{t}/ and {e}/" for t, e in PAIRS[:2 if sdxl else 1])
            check(any(src.exists(f, sub) for f in files),
                  f"{setting}: the model folder '{source}' has no {sub}/ ({sub}/{files[0]}); add the pipeline's "
                  f"{need} folders (save_pretrained){' (SDXL has two text encoders)' if sdxl else ''}, or give "
                  f"{embeddings_setting} instead")
    return src, index


def load_text_encoders(source: str, sdxl: bool = False, setting: str = "prompts",
                       embeddings_setting: str = "cond_embeddings") -> list[tuple[object, nn.Module]]:
    """``[(tokenizer, text encoder)]`` of the pipeline folder ``source`` (encoders float32, eval, CPU):
    ``tokenizer/`` + ``text_encoder/``, and with ``sdxl`` also ``tokenizer_2/`` + ``text_encoder_2/``."""
    transformers = _transformers(setting)
    src, index = _text_folder(source, setting, embeddings_setting, sdxl)

    def named(key: str, fallback: str) -> type:
        entry = index.get(key)
        name = entry[1] if isinstance(entry, list) and entry[1] else fallback
        cls = getattr(transformers, name, None)
        check(isinstance(cls, type), f"{setting}: '{source}/model_index.json' names {key} class {name!r}, which "
                                     "transformers does not have; fix model_index.json")
        return cls

    pairs = []
    for (tok_dir, enc_dir), fallback in zip(PAIRS[:2 if sdxl else 1], ("CLIPTextModel", "CLIPTextModelWithProjection")):
        try:
            tokenizer = named(tok_dir, "AutoTokenizer").from_pretrained(src.ref, subfolder=tok_dir)
            encoder = named(enc_dir, fallback).from_pretrained(src.ref, subfolder=enc_dir)
        except (OSError, ValueError) as err:
            raise GaqError(f"{setting}: cannot load {tok_dir}/ or {enc_dir}/ of '{source}': "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        pairs.append((tokenizer, encoder.to(torch.float32).eval()))
    return pairs


def encode_prompts(encoders: list[tuple[object, nn.Module]], prompts: list[str], setting: str = "prompts",
                   zero_uncond: bool = False) -> dict[str, Tensor]:
    """The tensors of an embeddings file (:mod:`gaq.models.conditions`) for ``prompts``, float32.

    One ``(tokenizer, encoder)`` (Stable Diffusion): as ``StableDiffusionPipeline.encode_prompt`` with
    ``clip_skip=None``: ``cond`` ``(P, L, D)``, each prompt padded and truncated to ``L =
    tokenizer.model_max_length``, the attention mask only where the encoder's config asks for it, the
    encoder's first output (the last hidden state); ``uncond`` ``(1, L, D)``, the empty prompt's.

    Two (SDXL): as ``StableDiffusionXLPipeline.encode_prompt``: ``cond`` the two encoders' penultimate
    hidden states side by side, ``text_embeds`` ``(P, E)`` the pooled output of the first encoder that has
    one (the projection of ``text_encoder_2``); ``uncond`` / ``uncond_text_embeds`` those of the empty
    prompt, or zeros with ``zero_uncond`` (the pipeline's ``force_zeros_for_empty_prompt``).
    """
    sdxl = len(encoders) > 1

    def run(batch: list[str], length: int | None = None) -> tuple[Tensor, Tensor | None]:
        states, pooled = [], None
        for tokenizer, encoder in encoders:
            inputs = tokenizer(batch, padding="max_length", max_length=length or tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            if not sdxl:
                mask = inputs["attention_mask"] if getattr(encoder.config, "use_attention_mask", False) else None
                return encoder(inputs["input_ids"], attention_mask=mask)[0].float(), None
            out = encoder(inputs["input_ids"], output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0].float()
            states.append(out.hidden_states[-2].float())
        return torch.cat(states, dim=-1), pooled

    for tokenizer, _ in encoders:
        length = int(getattr(tokenizer, "model_max_length", 0) or 0)
        check(0 < length < 100_000, f"{setting}: the tokenizer has no model_max_length ({length}); set it in its "
                                    "tokenizer_config.json (77 for CLIP)")
        long = sum(len(ids) > length for ids in tokenizer(prompts, padding=False, truncation=False)["input_ids"])
        if long:
            warnings.warn(f"{setting}: {long} of {len(prompts)} prompts are longer than the tokenizer's {length} "
                          "tokens and are truncated (as diffusers does)", stacklevel=2)
    with torch.no_grad():
        parts = [run(prompts[i:i + ENCODE_BATCH]) for i in range(0, len(prompts), ENCODE_BATCH)]
        cond = torch.cat([c for c, _ in parts])
        if sdxl and zero_uncond:
            uncond, u_pooled = torch.zeros_like(cond[:1]), None
        else:
            uncond, u_pooled = run([""], cond.shape[1])
    out = {"cond": cond, "uncond": uncond}
    if sdxl:
        check(parts[0][1] is not None, f"{setting}: neither text encoder gives a pooled embedding (SDXL's "
                                       "text_encoder_2 is a CLIPTextModelWithProjection); fix model_index.json")
        out["text_embeds"] = torch.cat([p for _, p in parts])
        out["uncond_text_embeds"] = torch.zeros_like(out["text_embeds"][:1]) if u_pooled is None else u_pooled
    return out


def text_encoder_digest(source: str) -> str | None:
    """sha256 of the files of ``source``'s ``tokenizer/`` and ``text_encoder/`` (and ``_2``) and its
    ``model_index.json`` (None for a hub id that is not on this machine); remembered per file size and
    modification time."""
    from gaq.models.loading import _resolve_source

    try:
        src = _resolve_source(source)
    except GaqError:
        return None
    if not src.local:
        return None
    files = sorted(p for pair in PAIRS for sub in pair for p in Path(src.ref, sub).rglob("*") if p.is_file())
    files.append(Path(src.ref, "model_index.json"))  # force_zeros_for_empty_prompt
    files = [p for p in files if p.is_file()]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(src.ref)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def _force_zeros(source: str) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` (model_index.json; the pipeline's default: True)."""
    from gaq.models.loading import _resolve_source

    index = _resolve_source(source).read_json("model_index.json") or {}
    return bool(index.get("force_zeros_for_empty_prompt", True))


def prompt_list_table(den, path: str, setting: str = "prompts", embeddings_setting: str = "cond_embeddings"
                      ) -> PromptTable:
    """The :class:`PromptTable` of the prompts in text file ``path``, encoded by ``den``'s pipeline folder.

    The table is kept for the rest of the process (keyed by the folder, the file's content and the
    text encoder's files), so evaluation, its FP samples and its grid encode once.
    """
    prompts = read_prompt_list(path, setting)
    config = getattr(den.model, "config", None) or {}
    sdxl = text_time_width(den.model) is not None
    check(config.get("caption_channels") is None,
          f"{setting}: PixArt's T5 prompts need their attention mask, which gaq does not pass; give "
          f"{embeddings_setting} instead")
    key = (den.source, _sha256(Path(path).read_bytes()), text_encoder_digest(den.source))
    if key[2] is None or key not in _TABLES:
        encoders = load_text_encoders(den.source, sdxl, setting, embeddings_setting)
        tensors = encode_prompts(encoders, prompts, setting, zero_uncond=sdxl and _force_zeros(den.source))
        table = prompt_table(tensors, den.model, den.image_shape[1:],
                             f"{setting} {path} (through the text encoders of '{den.source}')")
        if key[2] is None:
            return table
        _TABLES.clear()  # one prompt list at a time: a table is P x L x D floats
        _TABLES[key] = table
    return _TABLES[key]


def text_conditions(den, prompts: str | None, cond_embeddings: str | None, prefix: str = "") -> PromptTable:
    """The :class:`PromptTable` of a text model from exactly one of a prompt list and an embeddings file.

    Args:
        den: the text model (a :class:`gaq.models.loading.Denoiser`).
        prompts: text file, one prompt per line, or None.
        cond_embeddings: safetensors file of prompt embeddings, or None.
        prefix: the config section of both keys, for messages (``calib.``).
    """
    p_key, e_key = prefix + "prompts", prefix + "cond_embeddings"
    check(prompts is None or cond_embeddings is None,
          f"both {p_key} and {e_key} are set; keep one (a prompt list, or ready-made prompt embeddings)")
    check(prompts is not None or cond_embeddings is not None,
          f"text-conditional models need {p_key} (a text file, one prompt per line, encoded by the model folder's "
          f"text encoder) or {e_key} (a safetensors file with a 'cond' tensor (P, L, D) of prompt embeddings)")
    if cond_embeddings is not None:
        return load_prompt_table(cond_embeddings, den.model, den.image_shape[1:], e_key)
    return prompt_list_table(den, prompts, p_key, e_key)
