"""The params.yaml schema: every section's keys, types, ranges and choices, declared once.

``pipeline.params.load_params`` validates the sections a stage declares (after the dataset's
``overrides``) before the stage does any work, and reports every problem in one line with
its dotted name, the value and what is allowed. Types are strict: ``true`` is not an integer,
``"abc"`` is not a number, ``5`` is not a list, and a float is never truncated to an int.
Unknown keys are errors, so a typo never falls back to a default.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

DATASET_NAME = r"^[A-Za-z0-9_-]+$"  # names become folder names

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Threads = Annotated[int, Field(ge=0, description="0 = torch's default")]
Unit = Annotated[float, Field(ge=0, le=1)]
Ratio = Annotated[float, Field(ge=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
Device = Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")]
DatasetName = Annotated[str, Field(pattern=DATASET_NAME)]
OnBadLine = Literal["raise", "skip"]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# ---- datasets ---------------------------------------------------------------
class Splits(Section):
    train: Text
    valid: Text
    test: Text


class MnerDataset(Section):
    kind: Literal["mner"]
    format: Literal["twitter", "newsmkg", "conll"]
    dir: Text
    images: str = ""
    splits: Splits
    other_tag: Text = "MISC"
    on_bad_line: OnBadLine
    annotations: str = ""
    shared_images: Literal["warn", "raise"] = "warn"  # one IMGID in two splits
    overrides: dict[str, Any] = {}

    @model_validator(mode="after")
    def _images_folder(self) -> "MnerDataset":
        if self.format == "twitter" and not self.images:
            raise ValueError("format twitter needs `images`, the folder of <IMGID>.jpg under `dir`")
        return self


class RetrievalDataset(Section):
    kind: Literal["retrieval"]
    format: Literal["agree"]
    dir: Text
    images: Text
    train: str = ""
    test_texts: Text
    test_images: Text
    test_entities: str = ""
    on_bad_line: OnBadLine
    annotations: str = ""
    overrides: dict[str, Any] = {}


DATASET_KINDS: dict[str, type[Section]] = {"mner": MnerDataset, "retrieval": RetrievalDataset}


# ---- the demo -------------------------------------------------------------------
class DemoMner(Section):
    train: PosInt
    valid: PosInt
    test: PosInt
    ambiguous_share: Unit
    missing_images: NonNegInt
    broken_images: NonNegInt


class DemoRetrieval(Section):
    train_images: Annotated[int, Field(ge=2)]
    test_images: Annotated[int, Field(ge=2)]
    captions_per_image: PosInt
    missing_images: NonNegInt
    broken_images: NonNegInt


class Demo(Section):
    seed: NonNegInt
    image_size: Annotated[int, Field(ge=32)]
    mner: DemoMner
    retrieval: DemoRetrieval


# ---- images and extraction ------------------------------------------------------
class Images(Section):
    fallback: Literal["blank", "zero"]
    max_pixels: PosInt
    min_side: PosInt
    fallback_size: PosInt = 224
    formats: Annotated[list[Text], Field(min_length=1)] | None = None


class Shards(Section):
    size: PosInt
    # patch tokens, region features (pooled: float32); absent: float32 as before the key existed, params.yaml sets float16
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class Clip(Section):
    model: Text
    checkpoint: Text
    trusted_torchscript: bool = False
    batch_size: PosInt
    workers: NonNegInt
    device: Device
    threads: Threads
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast where the hardware has bfloat16 (else fp32, reported)


class Detector(Section):
    source: Literal["fasterrcnn", "annotations"]
    arch: Text
    checkpoint: Text
    score_thresh: Unit
    nms_iou: Unit
    topk: PosInt
    crop_batch_size: PosInt


class TextEncoder(Section):
    model: Text
    layers: Annotated[list[int], Field(min_length=1)]
    tune_top: NonNegInt
    max_length: Annotated[int, Field(ge=3)]
    batch_size: PosInt
    type_prompt: Annotated[str, Field(pattern=r"\{type\}")]  # {mask}: the mask token; {type}: the type name
    device: Device
    threads: Threads
    dtype: Literal["float32", "float16"] = "float32"  # word features and states as stored (read back as float32)


class Captions(Section):
    prompt: Annotated[str, Field(pattern=r"\{entity\}")]
    mask_token: Text
    slots: PosInt
    batch_size: PosInt
    dtype: Literal["float32", "float16"] = "float32"  # caption embeddings as stored (read back as float32)


# ---- the MNER model -------------------------------------------------------------
class Fusion(Section):
    hidden: PosInt
    layers: NonNegInt
    heads: PosInt
    slots_per_type: PosInt
    text_context: Literal["lstm", "transformer", "none"]
    adaptive: Literal["gate", "scalar", "none"]
    patch_queries: NonNegInt
    dropout: Ratio
    char_dim: NonNegInt
    shape_dim: NonNegInt
    use_image: bool
    use_patches: bool
    use_regions: bool

    @model_validator(mode="after")
    def _consistent(self) -> "Fusion":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.use_image and self.layers == 0:
            raise ValueError("layers 0 with use_image true: the image would reach only the alignment loss, never "
                             "a prediction; set use_image false for a text-only model, or layers >= 1")
        if self.use_image and not (self.use_patches or self.use_regions):
            raise ValueError("use_image true with use_patches and use_regions both false: no image branch is left; "
                             "set use_image false for a text-only model")
        return self


class Train(Section):
    seed: NonNegInt
    epochs: PosInt
    batch_size: PosInt
    lr: Positive
    lr_crf: Positive
    weight_decay: NonNeg
    warmup_ratio: Ratio
    grad_clip: NonNeg
    patience: PosInt
    lr_encoder: Positive
    encoder_warmup_ratio: Ratio
    threads: Threads


class Evaluate(Section):
    batch_size: PosInt
    threads: Threads


class Align(Section):
    weight: NonNeg
    temperature: Positive
    pooling: Literal["mean", "cls"]


# ---- retrieval (AGREE) ----------------------------------------------------------
class Retrieval(Section):
    index: Literal["flat", "ivf", "hnsw", "ivfpq"]
    pool: PosInt
    nlist: PosInt
    nprobe: PosInt
    hnsw_m: Annotated[int, Field(ge=2)]
    ef_search: PosInt
    ef_construction: PosInt
    pq_m: PosInt  # ivfpq: must divide the embedding dim (checked when the index is built)
    pq_bits: Annotated[int, Field(ge=1, le=16)]
    pq_rescore: PosInt
    recall_check: NonNegInt
    threads: Threads
    batch_size: PosInt


class EgrT2i(Section):
    s: float
    mask: float
    s1: float
    prompt: float


class EgrI2t(Section):
    s: float
    prompt: float
    s1: float
    mask: float


class Egr(Section):
    pad: Literal["agree", "entities"]
    t2i: EgrT2i
    i2t: EgrI2t


class Tbr(Section):
    absent_rank: PosInt


class Rerank(Section):
    top_k: PosInt
    pool: PosInt
    egr: Egr
    tbr: Tbr

    @model_validator(mode="after")
    def _top_k_in_pool(self) -> "Rerank":
        if self.top_k > self.pool:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed pool ({self.pool})")
        return self


class Score(Section):
    ks: Annotated[list[PosInt], Field(min_length=1)]


class AlignRetrieval(Section):
    enabled: bool
    dim: NonNegInt
    epochs: NonNegInt
    lr: Positive
    batch_size: Annotated[int, Field(ge=2)]
    temperature: Positive
    entity_weight: NonNeg
    weight_decay: NonNeg
    seed: NonNegInt
    threads: Annotated[int, Field(ge=1)]


DatasetList = Annotated[list[DatasetName], Field(min_length=0)]

# top-level key -> its type; a key not listed here is an error
SECTIONS: dict[str, Any] = {
    "datasets": dict[str, dict],  # each entry is checked by its kind (DATASET_KINDS)
    "mner_datasets": DatasetList,
    "retrieval_datasets": DatasetList,
    "image_datasets": DatasetList,
    "region_datasets": DatasetList,
    "demo": Demo,
    "images": Images,
    "shards": Shards,
    "clip": Clip,
    "detector": Detector,
    "text": TextEncoder,
    "captions": Captions,
    "fusion": Fusion,
    "train": Train,
    "evaluate": Evaluate,
    "align": Align,
    "retrieval": Retrieval,
    "rerank": Rerank,
    "score": Score,
    "align_retrieval": AlignRetrieval,
}
_ADAPTERS = {name: TypeAdapter(t, config=None if isinstance(t, type) and issubclass(t, BaseModel)
                                else ConfigDict(strict=True)) for name, t in SECTIONS.items()}


def _describe(err: dict) -> str:
    """Pydantic's message, phrased as what is allowed."""
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "missing"
    msg = err["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _problems(e: ValidationError, prefix: str, known: dict[str, list[str]]) -> list[str]:
    out = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        name = ".".join([prefix, *loc]) if prefix else ".".join(loc)
        text = _describe(err).replace("Input should be", "should be")
        if not loc:  # a rule across keys: the value is the whole section
            out.append(f"{name}: {text}")
            continue
        if err["type"] == "extra_forbidden":
            parent = name.rsplit(".", 1)[0]
            if parent in known:
                text += f" (allowed: {', '.join(known[parent])})"
            out.append(f"{name}: {text}")
        elif err["type"] == "missing":
            out.append(f"{name}: {text}")
        else:
            out.append(f"{name} = {err.get('input')!r}: {text}")
    return out


def _known_keys(prefix: str, model: Any) -> dict[str, list[str]]:
    """Dotted section name -> its keys, for 'unknown key (allowed: ...)' messages."""
    out: dict[str, list[str]] = {}
    if isinstance(model, type) and issubclass(model, BaseModel):
        out[prefix] = list(model.model_fields)
        for k, f in model.model_fields.items():
            out.update(_known_keys(f"{prefix}.{k}", f.annotation))
    return out


def _plain(v: Any) -> Any:
    """Mappings (e.g. a read-only params view) as dicts, so strict validation accepts them."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, list) else v


def check_section(name: str, value: Any) -> list[str]:
    """Problems with one top-level section (or one ``datasets.<name>`` entry); [] if valid."""
    value = _plain(value)
    if name.startswith("datasets."):
        ds = name.split(".", 1)[1]
        probs = [] if re.match(DATASET_NAME, ds) else [
            f"datasets.{ds}: a dataset name may use only letters, digits, '_' and '-' (it becomes a folder name)"]
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind not in DATASET_KINDS:
            return probs + [f"{name}.kind = {kind!r}: must be one of {', '.join(map(repr, DATASET_KINDS))}"]
        model = DATASET_KINDS[kind]
        try:
            model.model_validate(value, strict=True)
        except ValidationError as e:
            probs += _problems(e, name, _known_keys(name, model))
        return probs
    if name not in SECTIONS:
        return [f"{name}: unknown section (allowed: {', '.join(SECTIONS)})"]
    try:
        _ADAPTERS[name].validate_python(value, strict=True)
    except ValidationError as e:
        return _problems(e, name, _known_keys(name, SECTIONS[name]))
    if name == "datasets":
        return [p for ds, v in value.items() for p in check_section(f"datasets.{ds}", v)]
    return []


def validate_section(name: str, value: Any) -> None:
    """Raise ``ValueError`` listing every problem of one section (for library entry points)."""
    problems = check_section(name, value)
    if problems:
        raise ValueError(f"params.yaml: {'; '.join(problems)}")
