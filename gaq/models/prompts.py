"""Prompt lists: prompts of a text file run through the pipeline folder's own tokenizer and text encoder.

A text model takes its prompts one of two ways (exactly one per job):

- ``prompts``: a UTF-8 text file, one prompt per line (empty lines skipped, each line stripped; e.g.
  COCO captions as Q-Diffusion uses). gaq loads the model folder's ``tokenizer/`` and ``text_encoder/``
  (the classes its ``model_index.json`` names; ``AutoTokenizer`` / ``CLIPTextModel`` without one) and
  encodes as diffusers' ``StableDiffusionPipeline.encode_prompt`` does: every prompt padded (and
  truncated) to the tokenizer's ``model_max_length``, the attention mask passed only when the text
  encoder's config sets ``use_attention_mask``, the last hidden state kept (``cond``, ``(P, L, D)``), and
  the empty prompt padded the same way as the unconditional row (``uncond``). Needs ``transformers``
  (``pip install 'gaq[text]'``); it is imported only here, when a prompt list is given.
- ``cond_embeddings``: a safetensors file of ready-made embeddings (:mod:`gaq.models.conditions`).

Both end in the same :func:`gaq.models.conditions.prompt_table`. SDXL-style UNets (two text encoders,
pooled embeddings) and PixArt (a T5 encoder whose attention mask its transformer takes) are refused for
prompt lists with one line: give them the embeddings file.
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


def _text_folder(source: str, setting: str, embeddings_setting: str):
    """The resolved model source, after checking it has a tokenizer and a text encoder gaq can run."""
    from gaq.models.loading import _resolve_source

    check(source and source != "<in-memory>",
          f"{setting} needs the model's pipeline folder (its tokenizer/ and text_encoder/), but this model was "
          f"built in memory: load it with load_denoiser(folder), or give {embeddings_setting} instead")
    src = _resolve_source(source)
    index = src.read_json("model_index.json") or {}
    check(not any(isinstance(index.get(k), list) and index[k][1] for k in ("text_encoder_2", "tokenizer_2")),
          f"{setting}: '{source}' has a second text encoder (SDXL-style); gaq encodes prompts with one CLIP text "
          f"encoder: give {embeddings_setting} (a safetensors file of prompt embeddings) instead")
    for sub, files in ((TEXT_ENCODER_DIR, ("config.json",)),
                       (TOKENIZER_DIR, ("tokenizer_config.json", "tokenizer.json", "vocab.json"))):
        check(any(src.exists(f, sub) for f in files),
              f"{setting}: the model folder '{source}' has no {sub}/ ({sub}/{files[0]}); add the pipeline's "
              f"{TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/ folders (save_pretrained), or give {embeddings_setting} instead")
    return src, index


def load_text_encoder(source: str, setting: str = "prompts", embeddings_setting: str = "cond_embeddings"
                      ) -> tuple[object, nn.Module]:
    """The tokenizer and the text encoder (float32, eval, CPU) of the pipeline folder ``source``."""
    transformers = _transformers(setting)
    src, index = _text_folder(source, setting, embeddings_setting)

    def named(key: str, fallback: str) -> type:
        entry = index.get(key)
        name = entry[1] if isinstance(entry, list) and entry[1] else fallback
        cls = getattr(transformers, name, None)
        check(isinstance(cls, type), f"{setting}: '{source}/model_index.json' names {key} class {name!r}, which "
                                     "transformers does not have; fix model_index.json")
        return cls

    try:
        tokenizer = named(TOKENIZER_DIR, "AutoTokenizer").from_pretrained(src.ref, subfolder=TOKENIZER_DIR)
        encoder = named(TEXT_ENCODER_DIR, "CLIPTextModel").from_pretrained(src.ref, subfolder=TEXT_ENCODER_DIR)
    except (OSError, ValueError) as err:
        raise GaqError(f"{setting}: cannot load the tokenizer / text encoder of '{source}': "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return tokenizer, encoder.to(torch.float32).eval()


def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], setting: str = "prompts"
                   ) -> dict[str, Tensor]:
    """``cond`` ``(P, L, D)`` of ``prompts`` and ``uncond`` ``(1, L, D)`` of the empty prompt, float32.

    As ``StableDiffusionPipeline.encode_prompt`` with ``clip_skip=None``: padded and truncated to
    ``L = tokenizer.model_max_length``, the attention mask only where the encoder's config asks for it,
    the encoder's first output (the last hidden state).
    """
    length = int(getattr(tokenizer, "model_max_length", 0) or 0)
    check(0 < length < 100_000, f"{setting}: the tokenizer has no model_max_length ({length}); set it in "
                                "tokenizer/tokenizer_config.json (77 for CLIP)")
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

    def run(batch: list[str]) -> Tensor:
        inputs = tokenizer(batch, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = inputs["attention_mask"] if use_mask else None
        return text_encoder(inputs["input_ids"], attention_mask=mask)[0].float()

    long = sum(len(ids) > length for ids in tokenizer(prompts, padding=False, truncation=False)["input_ids"])
    if long:
        warnings.warn(f"{setting}: {long} of {len(prompts)} prompts are longer than the tokenizer's {length} tokens "
                      "and are truncated (as diffusers does)", stacklevel=2)
    with torch.no_grad():
        cond = torch.cat([run(prompts[i:i + ENCODE_BATCH]) for i in range(0, len(prompts), ENCODE_BATCH)])
        return {"cond": cond, "uncond": run([""])}


def text_encoder_digest(source: str) -> str | None:
    """sha256 of the files of ``source``'s ``tokenizer/`` and ``text_encoder/`` (None for a hub id that is
    not on this machine); remembered per file size and modification time."""
    from gaq.models.loading import _resolve_source

    try:
        src = _resolve_source(source)
    except GaqError:
        return None
    if not src.local:
        return None
    files = sorted(p for sub in (TOKENIZER_DIR, TEXT_ENCODER_DIR) for p in Path(src.ref, sub).rglob("*") if p.is_file())
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


def prompt_list_table(den, path: str, setting: str = "prompts", embeddings_setting: str = "cond_embeddings"
                      ) -> PromptTable:
    """The :class:`PromptTable` of the prompts in text file ``path``, encoded by ``den``'s pipeline folder.

    The table is kept for the rest of the process (keyed by the folder, the file's content and the
    text encoder's files), so evaluation, its FP samples and its grid encode once.
    """
    prompts = read_prompt_list(path, setting)
    config = getattr(den.model, "config", None) or {}
    check(text_time_width(den.model) is None,
          f"{setting}: the model is SDXL-style (addition_embed_type text_time: two text encoders and pooled "
          f"embeddings), which gaq does not encode; give {embeddings_setting} instead")
    check(config.get("caption_channels") is None,
          f"{setting}: PixArt's T5 prompts need their attention mask, which gaq does not pass; give "
          f"{embeddings_setting} instead")
    key = (den.source, _sha256(Path(path).read_bytes()), text_encoder_digest(den.source))
    if key[2] is None or key not in _TABLES:
        tokenizer, encoder = load_text_encoder(den.source, setting, embeddings_setting)
        table = prompt_table(encode_prompts(tokenizer, encoder, prompts, setting), den.model, den.image_shape[1:],
                             f"{setting} {path} (through the text encoder of '{den.source}')")
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
