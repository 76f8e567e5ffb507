"""Dataset and collate: one padded MNER batch assembled from the feature caches.

Sources are duck-typed so the model can be trained on plain in-memory data as well:
  text     ``.get(sample_id) -> (n_kept_words, L, d_t)``, ``.type_prompts -> {type: (L, d_t)}``,
           ``.states(sample_id) -> ((n_subwords, d_t), (n_kept_words,))`` (only with ``states=True``)
  patches  ``.get(image_id) -> {"pooled" (D,), "patch_tokens" (P, W), "is_fallback"}`` and ``in``
  regions  ``.get(image_id) -> {"feats" (K, Dr), "boxes" (K, 4), "labels" (K,), "scores" (K,),
            "mask" (K,), "is_fallback"}`` and ``in``
(``pipeline.stores.tables.TextFeatures`` and ``pipeline.stores.shards.ShardReader``).
A branch that the model does not use is never read. Words the text encoder cut off are not
in the batch; :attr:`MNERDataset.n_kept` lets the caller predict them as ``O``. Character ids
and word shapes (``chars=True``) come from the samples' own tokens (:mod:`pipeline.mner.chars`).

Items a dataset has read are kept for the next epoch up to a byte budget
(:data:`ITEM_CACHE_BYTES` per dataset): the first items read are kept until the budget is
spent, the rest are read again from the caches each time they are asked for, so memory does
not grow with the split. The values are the same either way (the caches are read-only).
"""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Bytes of items (arrays) one MNERDataset keeps between epochs. The demo's train split (320
# samples with images) is 23 MB, so it is held whole; a larger split keeps its first 32 MiB
# and reads the rest through the caches' own row-group LRU every epoch (bench/stage_memory.py).
ITEM_CACHE_BYTES = 32 << 20


def item_nbytes(item: Mapping[str, Any]) -> int:
    """Bytes of the arrays in one dataset item (what the item cache counts)."""
    return sum(v.nbytes for v in item.values() if isinstance(v, np.ndarray))


@dataclass
class Sample:
    sample_id: str
    image_id: str
    tokens: list[str]
    tags: list[str]  # full gold sequence (BIO)


class SampleTable(Sequence):
    """The samples of one split kept as Arrow columns; a :class:`Sample` is built on each access.

    As Python objects a sample costs about 3 KB (a string object per token and tag), so a
    split of 80k would hold 230 MB for as long as it trains; as Arrow columns it is the
    size of its text. Tag strings are interned (a handful of distinct values).
    """

    COLUMNS = ("sample_id", "image_id", "tokens", "tags")

    def __init__(self, table: Any) -> None:
        t = table.select(list(self.COLUMNS)).combine_chunks()
        self._sid, self._img, self._tok, self._tags = (t.column(c).chunks[0] if t.num_rows else t.column(c)
                                                       for c in self.COLUMNS)
        self._n = t.num_rows

    def __len__(self) -> int:
        return self._n

    @property
    def sample_ids(self) -> list[str]:
        return self._sid.to_pylist()

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} out of range ({self._n} samples)")
        return Sample(str(self._sid[i].as_py()), str(self._img[i].as_py()), list(self._tok[i].as_py()),
                      [sys.intern(t) for t in self._tags[i].as_py()])


def split_samples(table: Any, split: str) -> SampleTable:
    """Rows of a prepared ``samples.parquet`` (pyarrow table or path) for one split, in file order (compact)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = list(SampleTable.COLUMNS)
    if not isinstance(table, (str, Path)):
        return SampleTable(table.filter(pc.equal(table.column("split"), split)))
    # read in batches and keep only the split's rows: reading the whole file at once peaks at
    # several times its Arrow size (about 4x at 100k samples)
    pf = pq.ParquetFile(table, pre_buffer=False, buffer_size=1 << 16)
    pieces = [pa.Table.from_batches([b]).filter(pc.equal(b.column("split"), split)).select(cols).combine_chunks()
              for b in pf.iter_batches(batch_size=8192, columns=["split", *cols], use_threads=False)]
    out = SampleTable(pa.concat_tables(pieces) if pieces else pf.schema_arrow.empty_table().select(cols))
    del pieces
    pa.default_memory_pool().release_unused()
    return out


def samples_from_table(table: Any, split: str) -> list[Sample]:
    """Rows of a prepared ``samples.parquet`` (pyarrow table or path) for one split, in file order."""
    return list(split_samples(table, split))


def image_fallbacks_from_table(table: Any) -> dict[str, bool]:
    """image_id -> is_fallback from a prepared ``images.parquet`` (table or path)."""
    import pyarrow.parquet as pq

    if isinstance(table, (str, Path)):
        table = pq.read_table(table)
    cols = table.to_pydict()
    return {str(i): bool(f) for i, f in zip(cols["image_id"], cols["is_fallback"])}


def _read(reader: Any, item_id: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Only the named arrays of one item (those the reader has)."""
    have = getattr(reader, "datasets", None)
    names = tuple(n for n in names if have is None or n in have)
    return reader.get(item_id, names)


class MNERDataset(Dataset):
    """One split: cached word features, tag ids and the vision inputs the model uses."""

    def __init__(self, samples: Sequence[Sample], text: Any, tag_index: Mapping[str, int], *,
                 patches: Any = None, regions: Any = None,
                 image_fallback: Mapping[str, bool] | None = None, cache: bool = True,
                 chars: bool = False, states: bool = False, cache_bytes: int = ITEM_CACHE_BYTES) -> None:
        self.samples = samples if isinstance(samples, SampleTable) else list(samples)
        self.chars, self.states = chars, states
        self.text, self.patches, self.regions = text, patches, regions
        self.tag_index = dict(tag_index)
        self.image_fallback = dict(image_fallback or {})
        self.cache = cache
        self.cache_bytes = int(cache_bytes)  # budget of the item cache (see ITEM_CACHE_BYTES)
        self.cached_bytes = 0                # bytes of the items held now
        self._items: dict[int, dict[str, Any]] = {}
        self.n_kept: list[int | None] = [None] * len(self.samples)
        self.fallback_reasons: Counter = Counter()
        self._fallback_seen: set[int] = set()
        for s in self.samples:
            if len(s.tokens) != len(s.tags):
                raise ValueError(f"sample {s.sample_id}: {len(s.tokens)} tokens but {len(s.tags)} tags")
            bad = [t for t in s.tags if t not in self.tag_index]
            if bad:
                raise ValueError(f"sample {s.sample_id}: tag {bad[0]!r} is not in the label map "
                                 f"({', '.join(self.tag_index)}); is its type missing from the type prompts?")

    def __len__(self) -> int:
        return len(self.samples)

    def _shape_from(self, reader: Any, keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        first = _read(reader, reader.ids[0], keys)
        return tuple(np.zeros_like(np.asarray(first[k])) for k in keys)

    def _vision(self, i: int, image_id: str, item: dict[str, Any]) -> None:
        fallback = bool(self.image_fallback.get(image_id, False))
        reasons = []
        if fallback:
            reasons.append("manifest")
        if self.patches is not None:
            if image_id in self.patches:
                rec = _read(self.patches, image_id, ("pooled", "patch_tokens", "is_fallback"))
                item["pooled"] = np.asarray(rec["pooled"], dtype=np.float32)          # (D,)
                item["patches"] = np.asarray(rec["patch_tokens"], dtype=np.float32)   # (P, W)
                if bool(np.asarray(rec.get("is_fallback", False))):
                    fallback = True
                    reasons.append("patches")
            else:
                pooled, pt = self._shape_from(self.patches, ("pooled", "patch_tokens"))
                item["pooled"], item["patches"] = pooled.astype(np.float32), pt.astype(np.float32)
                fallback = True
                reasons.append("not_in_patch_cache")
        if self.regions is not None:
            keys = ("feats", "boxes", "labels", "scores", "mask")
            if image_id in self.regions:
                rec = _read(self.regions, image_id, keys + ("is_fallback",))
                vals = [np.asarray(rec[k]) for k in keys]
                if bool(np.asarray(rec.get("is_fallback", False))):
                    fallback = True
                    reasons.append("regions")
            else:
                vals = list(self._shape_from(self.regions, keys))
                fallback = True
                reasons.append("not_in_region_cache")
            item["region_feats"] = vals[0].astype(np.float32)    # (K, Dr)
            item["region_boxes"] = vals[1].astype(np.float32)    # (K, 4)
            item["region_labels"] = vals[2].astype(np.int64)     # (K,)
            item["region_scores"] = vals[3].astype(np.float32)   # (K,)
            item["region_mask"] = vals[4].astype(bool)           # (K,)
        item["has_image"] = not fallback
        if fallback and i not in self._fallback_seen:
            self._fallback_seen.add(i)
            self.fallback_reasons.update(set(reasons) or {"manifest"})

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i in self._items:
            return self._items[i]
        s = self.samples[i]
        words = np.asarray(self.text.get(s.sample_id), dtype=np.float32)  # (n_kept, L, d_t)
        if words.ndim == 2:  # one stored layer without its axis
            words = words[:, None, :]
        n = words.shape[0]
        if n > len(s.tokens):
            raise ValueError(f"sample {s.sample_id}: text cache has {n} words but the sample has {len(s.tokens)}")
        self.n_kept[i] = n
        item: dict[str, Any] = {
            "index": i,
            "words": words,
            "tags": np.asarray([self.tag_index[t] for t in s.tags[:n]], dtype=np.int64),  # (n,)
        }
        if self.chars:
            from pipeline.mner.chars import char_ids, shape_ids

            item["chars"] = char_ids(s.tokens[:n])    # (n, C)
            item["shapes"] = shape_ids(s.tokens[:n])  # (n,)
        if self.states:
            states, first = self.text.states(s.sample_id)  # (S, d_t), (n,)
            if len(first) != n or (n and int(first.max()) >= len(states)):
                raise ValueError(f"sample {s.sample_id}: sub-word states ({len(states)} positions, {len(first)} "
                                 f"first sub-words) do not match its {n} cached words; rerun the text stage")
            item["sub_states"] = np.asarray(states, dtype=np.float32)
            item["first"] = np.asarray(first, dtype=np.int64)
        self._vision(i, s.image_id, item)
        if self.cache:
            nb = item_nbytes(item)
            if self.cached_bytes + nb <= self.cache_bytes:  # kept until the budget is spent, never evicted
                self._items[i] = item
                self.cached_bytes += nb
        return item

    def kept_words(self) -> list[int]:
        """Kept-word count per sample (reads the text cache for samples not seen yet)."""
        return [self.n_kept[i] if self.n_kept[i] is not None else self[i]["words"].shape[0] for i in range(len(self))]

    @property
    def n_image_fallbacks(self) -> int:
        return len(self._fallback_seen)


def collate(items: list[dict[str, Any]], type_prompts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pad a list of items into one batch (see :mod:`pipeline.mner.model` for the layout)."""
    B = len(items)
    N = max(1, max(it["words"].shape[0] for it in items))
    L, d = items[0]["words"].shape[1:] if items[0]["words"].shape[0] else type_prompts.shape[1:]
    words = torch.zeros(B, N, L, d)
    tags = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, it in enumerate(items):
        n = it["words"].shape[0]
        if n:
            words[b, :n] = torch.from_numpy(it["words"])
            tags[b, :n] = torch.from_numpy(it["tags"])
            mask[b, :n] = True
    batch: dict[str, torch.Tensor] = {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "words": words, "word_mask": mask, "tags": tags,                  # (B,N,L,d) (B,N) (B,N)
        "has_image": torch.tensor([bool(it["has_image"]) for it in items]),  # (B,)
        "type_prompts": type_prompts,                                      # (T, L, d)
    }
    if "chars" in items[0]:
        C = items[0]["chars"].shape[1]
        batch["chars"] = torch.zeros(B, N, C, dtype=torch.long)  # (B, N, C) 0 = padding
        batch["shapes"] = torch.zeros(B, N, dtype=torch.long)    # (B, N)
        for b, it in enumerate(items):
            n = it["chars"].shape[0]
            batch["chars"][b, :n] = torch.from_numpy(it["chars"])
            batch["shapes"][b, :n] = torch.from_numpy(it["shapes"])
    if "sub_states" in items[0]:
        S = max(1, max(it["sub_states"].shape[0] for it in items))
        batch["sub_states"] = torch.zeros(B, S, items[0]["sub_states"].shape[1])  # (B, S, d_t)
        batch["sub_mask"] = torch.zeros(B, S, dtype=torch.bool)                  # (B, S)
        batch["first"] = torch.zeros(B, N, dtype=torch.long)                      # (B, N)
        for b, it in enumerate(items):
            m, n = it["sub_states"].shape[0], it["first"].shape[0]
            batch["sub_states"][b, :m] = torch.from_numpy(it["sub_states"])
            batch["sub_mask"][b, :max(1, m)] = True  # an empty sample keeps one key (never read)
            batch["first"][b, :n] = torch.from_numpy(it["first"])
    for key in ("pooled", "patches", "region_feats", "region_boxes", "region_labels", "region_scores", "region_mask"):
        if key in items[0]:
            batch[key] = torch.from_numpy(np.stack([it[key] for it in items]))
    return batch


def type_prompt_tensor(type_prompts: Mapping[str, np.ndarray], types: Sequence[str]) -> torch.Tensor:
    """(T, L, d_t) float tensor of the type prompts in ``types`` order."""
    missing = [t for t in types if t not in type_prompts]
    if missing:
        raise KeyError(f"text cache has no type prompt for {missing} (has {sorted(type_prompts)})")
    arrs = []
    for t in types:
        a = np.asarray(type_prompts[t], dtype=np.float32)
        arrs.append(a[None] if a.ndim == 1 else a)
    return torch.from_numpy(np.stack(arrs))


def make_collate(type_prompts: torch.Tensor):
    """A picklable collate function bound to the type prompts."""
    return partial(collate, type_prompts=type_prompts)


# ---- wiring to the project's caches -------------------------------------------------------
@dataclass
class Caches:
    """The caches of one MNER dataset, opened for the branches a model uses."""

    dataset: str
    text: Any                       # pipeline.stores.tables.TextFeatures
    patches: Any                    # pipeline.stores.shards.ShardReader | None
    regions: Any                    # pipeline.stores.shards.ShardReader | None
    samples_path: Path
    image_fallback: dict[str, bool]

    @property
    def has_images(self) -> bool:
        """False for a dataset whose prepared image manifest is empty (plain CoNLL text)."""
        return bool(self.image_fallback)

    def samples(self, split: str) -> SampleTable:
        out = split_samples(self.samples_path, split)
        if not len(out):
            raise ValueError(f"{self.samples_path}: no samples in split {split!r}")
        return out

    def dataset_for(self, split: str, tag_index: Mapping[str, int], chars: bool = False,
                    states: bool = False, cache: bool = True, cache_bytes: int = ITEM_CACHE_BYTES) -> MNERDataset:
        """``cache=False`` for a split read once (evaluate): nothing is kept. A split read every
        epoch whose text is larger than the item cache reads it from a flat copy
        (:class:`~pipeline.stores.flat.FlatText`): shuffled reads of the Parquet cache would
        decode a row group per sample."""
        from pipeline.stores.flat import FlatText
        from pipeline.stores.tables import TextFeatures

        samples = self.samples(split)
        text = self.text
        if cache and isinstance(text, TextFeatures):
            ids = samples.sample_ids
            if text.nbytes(ids, states=states) > cache_bytes:
                text = FlatText(text, ids, states=states)
        return MNERDataset(samples, text, tag_index, patches=self.patches, regions=self.regions,
                           image_fallback=self.image_fallback, chars=chars, states=states, cache=cache,
                           cache_bytes=cache_bytes)

    def dims(self) -> dict[str, int]:
        """Input sizes for :class:`pipeline.mner.model.MNERConfig` (0 for unused branches)."""
        d = {"d_text": int(self.text.dim), "n_text_layers": int(self.text.n_layers),
             "d_pooled": 0, "d_patch": 0, "d_region": 0, "n_region_labels": 91}
        prov = self.text.provenance.get("params", {})
        if prov.get("depth"):  # older caches have no depth: no tuning possible, layers unknown
            depth = int(prov["depth"])
            d["depth"] = depth
            from pipeline.encoders.text import absolute_layers

            d["text_layers"] = absolute_layers(prov["layers"], depth)
        if self.patches is not None:
            d["d_pooled"] = int(self.patches.datasets["pooled"][0][-1])
            d["d_patch"] = int(self.patches.datasets["patch_tokens"][0][-1])
        if self.regions is not None:
            d["d_region"] = int(self.regions.datasets["feats"][0][-1])
            labels = self.regions.read_all("labels")
            if labels.size:  # COCO ids as torchvision numbers them (91 slots) or more
                d["n_region_labels"] = max(91, int(labels.max()) + 1)
        return d

    def provenance(self) -> dict[str, Any]:
        """What the model is trained on: cache provenance / fingerprints per branch."""
        from pipeline.artifacts import fingerprint

        out: dict[str, Any] = {"text": fingerprint(self.text.provenance)}
        if self.patches is not None:
            out["patches"] = self.patches.fingerprint
        if self.regions is not None:
            out["regions"] = self.regions.fingerprint
        return out


def open_caches(dataset: str, use_patches: bool, use_regions: bool) -> Caches:
    """Open ``features/<dataset>/{text,patches,regions}`` and ``data/prepared/<dataset>``.

    A branch that is switched off, or a dataset without images, opens no image cache at all.
    """
    from pipeline.paths import project_path
    from pipeline.stores.shards import ShardReader
    from pipeline.stores.tables import TextFeatures

    feats = project_path(f"features/{dataset}")
    prepared = project_path(f"data/prepared/{dataset}")
    samples = prepared / "samples.parquet"
    images = prepared / "images.parquet"
    for p in (samples, images):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found; it is written by the `prepare` stage (run `dvc repro prepare@{dataset}`)")
    fallback = image_fallbacks_from_table(images)
    has_images = bool(fallback)
    for branch, used in (("patches", use_patches), ("regions", use_regions)):
        if used and has_images and not (feats / branch).is_dir():
            raise FileNotFoundError(
                f"{feats / branch}: not found, but {dataset} has images and fusion.use_image is on: list "
                f"{dataset} in {'image_datasets' if branch == 'patches' else 'region_datasets'} in params.yaml "
                f"(its {branch} stage runs only for those), "
                f"or set fusion.use_image: false")
    return Caches(
        dataset=dataset,
        text=TextFeatures(feats / "text"),
        patches=ShardReader(feats / "patches", stage=f"patches@{dataset}") if use_patches and has_images else None,
        regions=ShardReader(feats / "regions", stage=f"regions@{dataset}") if use_regions and has_images else None,
        samples_path=samples,
        image_fallback=fallback,
    )
