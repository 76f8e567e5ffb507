"""The test-split retrieval set: ground truth from the prepared manifests, embeddings from caches.

Image embeddings come from the ``patches`` cache (``pooled``), caption / prompt /
masked-caption embeddings from the ``captions`` cache, or both from the ``align_retrieval`` stage's
adapted copies. Every embedding is L2-normalised here. Ids are matched by value and a
mismatch between two files is an :class:`IdMismatchError` naming both files.

With ``scratch`` (a directory, see :func:`scratch_dir`) the embeddings are not loaded: they
are streamed from the shards / caption row groups into float32 ``.npy`` files there (rows
normalised block by block, the same bits as the in-memory path) and opened read-only with
``np.load(mmap_mode="r")``, so a gallery larger than RAM can be searched (``retrieval.index:
ivfpq`` keeps only its codes in memory and reads candidate rows from the file).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.retrieval.index import l2_normalize, release_pages

SOURCES = ("zero_shot", "aligned")
ALIGNED_IMAGES = "images.parquet"
DISABLED_MARK = "DISABLED.json"
SCRATCH_PREFIX = "retrieve-gallery-"
HASH_ROWS = 65_536  # rows hashed / counted at a time (a memory-mapped array is never read whole)


class IdMismatchError(ValueError):
    """Ids of one file are missing from another file that must hold them."""


def match_ids(wanted: list[str], have: list[str], wanted_file: str | os.PathLike, have_file: str | os.PathLike,
              what: str) -> np.ndarray:
    """Rows of ``have`` holding each id of ``wanted`` (in ``wanted`` order); missing ids raise."""
    pos = {k: i for i, k in enumerate(have)}
    missing = [k for k in wanted if k not in pos]
    if missing:
        raise IdMismatchError(
            f"{len(missing)} of {len(wanted)} {what} ids listed in {wanted_file} are missing from {have_file} "
            f"(e.g. {missing[:5]}); the two files come from different inputs: rerun the stage that writes {have_file}")
    return np.fromiter((pos[k] for k in wanted), dtype=np.int64, count=len(wanted))


def _unit_rows(a: np.ndarray, what: str) -> np.ndarray:
    """L2-normalise the last axis of (N, ..., D)."""
    a = np.asarray(a)
    return l2_normalize(a.reshape(-1, a.shape[-1]), what).reshape(a.shape)


def _hash_arrays(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            if p.ndim == 0:
                h.update(np.ascontiguousarray(p).tobytes())
            for s in range(0, p.shape[0] if p.ndim else 0, HASH_ROWS):  # same bytes as the whole array's
                h.update(np.ascontiguousarray(p[s:s + HASH_ROWS]))  # the buffer itself: no copy of the block
                release_pages(p)
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


@dataclass
class RetrievalSet:
    """One split of a retrieval dataset, rows aligned with the id lists."""

    image_ids: list[str]            # gallery.parquet order
    caption_ids: list[str]          # captions.parquet order
    image_emb: np.ndarray           # (Ni, D) unit rows
    caption_emb: np.ndarray         # (Nc, D) unit rows
    prompt_emb: np.ndarray          # (Nc, S, D) unit rows
    mask_emb: np.ndarray            # (Nc, S, D) unit rows
    n_entities: np.ndarray          # (Nc,) int
    t2i_gold: dict[str, list[str]]  # caption id -> ground-truth image ids
    i2t_gold: dict[str, list[str]]  # image id -> its caption ids
    info: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of ids and embeddings: what retrieval ran on (rerank checks it is unchanged)."""
        return _hash_arrays(self.image_ids, self.caption_ids, self.image_emb, self.caption_emb,
                            self.prompt_emb, self.mask_emb, self.n_entities)


def _zero_rows(a: np.ndarray) -> int:
    """All-zero rows of (N, D), counted a block of rows at a time."""
    n = 0
    for s in range(0, a.shape[0], HASH_ROWS):
        n += int((~a[s:s + HASH_ROWS].any(axis=1)).sum())
        release_pages(a)
    return n


@contextmanager
def scratch_dir(parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh temporary directory for memory-mapped embeddings, removed on exit (also on an error).

    ``parent``: where to make it (default: ``$TMPDIR`` or the system's temp dir; it needs the
    gallery's float32 size, and the caption side's S + 2 vectors a caption, free on disk).
    """
    d = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def gather_rows(blocks: Iterable[tuple[int, np.ndarray]], n_source: int, rows: np.ndarray,
                path: str | os.PathLike, what: str) -> np.ndarray:
    """Rows ``rows`` of a source (N, ...) read as ``(first row, block)`` pieces, L2-normalised on
    the last axis, written to a float32 ``.npy`` at ``path`` (atomically), opened memory-mapped
    read-only. Output row i is source row ``rows[i]``. Only one block is in memory at a time."""
    from pipeline.artifacts import atomic_path

    rows = np.asarray(rows, np.int64)
    dest = np.full(n_source, -1, np.int64)  # source row -> output row
    dest[rows] = np.arange(rows.size)
    out = None
    filled = 0
    with atomic_path(path) as tmp:
        for start, block in blocks:
            block = np.asarray(block)
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows.size, *block.shape[1:]))
            d = dest[start:start + block.shape[0]]
            keep = d >= 0
            if keep.any():
                out[d[keep]] = _unit_rows(block[keep], what)
                filled += int(keep.sum())
                out.flush()  # written back, so its pages can leave the resident set
                release_pages(out)
        if out is None:
            raise ValueError(f"{what}: no rows to read")
        out.flush()
        del out
        if filled != rows.size:
            raise ValueError(f"{what}: {filled} of {rows.size} rows found while streaming")
    return np.load(path, mmap_mode="r")


def _table_blocks(table: Any, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, (B, ...) block)`` per row group of a FeatureTable array column (rows share a shape)."""
    for start, values, _, shapes in table.iter_groups(name):
        if not len(shapes):
            continue
        if np.any(shapes != shapes[0]):
            raise ValueError(f"{table.path}: column {name!r} has rows of different shapes; cannot stack")
        yield start, values.reshape(len(shapes), *(int(x) for x in shapes[0]))


def read_ground_truth(prepared_dir: str | os.PathLike, split: str = "test") -> tuple[dict, dict, dict]:
    """(t2i_gold, i2t_gold, info) of ``split`` from captions.parquet and gallery.parquet."""
    from pipeline.stores.tables import manifest_rows

    d = Path(prepared_dir)
    cap_file, gal_file = d / "captions.parquet", d / "gallery.parquet"
    caps = [r for r in manifest_rows(cap_file, ["split", "caption_id", "image_ids"]) if r["split"] == split]
    gal = [r for r in manifest_rows(gal_file, ["split", "image_id", "caption_ids"]) if r["split"] == split]
    if not caps or not gal:
        raise ValueError(f"{d}: no {split!r} split ({len(caps)} captions in {cap_file.name}, "
                         f"{len(gal)} images in {gal_file.name})")
    t2i = {str(r["caption_id"]): [str(i) for i in r["image_ids"]] for r in caps}
    i2t = {str(r["image_id"]): [str(c) for c in r["caption_ids"]] for r in gal}
    if len(t2i) != len(caps) or len(i2t) != len(gal):
        raise ValueError(f"{d}: repeated caption or image ids in the {split!r} split")
    in_gallery = set(i2t)
    unreachable = [c for c, imgs in t2i.items() if not any(i in in_gallery for i in imgs)]
    listed = {c for cs in i2t.values() for c in cs}
    info = {"split": split, "captions": len(t2i), "images": len(i2t),
            "captions_without_gallery_image": len(unreachable),
            "gallery_captions_not_in_captions": len(listed - set(t2i))}
    if info["gallery_captions_not_in_captions"]:
        bad = sorted(listed - set(t2i))[:5]
        raise IdMismatchError(f"{gal_file} lists {split} captions that {cap_file} does not have (e.g. {bad})")
    return t2i, i2t, info


def load_retrieval_set(dataset: str, source: str = "zero_shot", split: str = "test",
                       root: str | os.PathLike | None = None,
                       scratch: str | os.PathLike | None = None) -> RetrievalSet:
    """The ``split`` of ``dataset`` with embeddings from ``source`` (zero_shot | aligned).

    Paths follow the fixed layout: data/prepared/<ds>, features/<ds>/{patches,captions,aligned}.
    With ``scratch`` (an existing directory the caller removes, e.g. :func:`scratch_dir`) every
    embedding array is a read-only memory-map of a float32 ``.npy`` there, streamed from the
    caches: the same values, ids and fingerprint as without it, none of it held in RAM.
    """
    from pipeline.paths import project_path

    base = Path(root) if root is not None else project_path(".")
    prepared = base / "data" / "prepared" / dataset
    feats = base / "features" / dataset
    t2i, i2t, info = read_ground_truth(prepared, split)
    caption_ids, image_ids = list(t2i), list(i2t)
    lazy = scratch is not None
    if source == "zero_shot":
        img_ids, img, img_file, img_prov = _zero_shot_images(feats / "patches", lazy)
        cap, cap_file = _captions(feats / "captions")
    elif source == "aligned":
        adir = feats / "aligned"
        if (adir / DISABLED_MARK).is_file():
            raise ValueError(f"{adir}: the align_retrieval stage ran with align_retrieval.enabled: false; "
                             "set it to true (or use the zero-shot embeddings)")
        img_ids, img, img_file, img_prov = _aligned_images(adir / ALIGNED_IMAGES, lazy)
        cap, cap_file = _captions(adir)
    else:
        raise ValueError(f"embedding source must be one of {', '.join(SOURCES)}, got {source!r}")
    irows = match_ids(image_ids, img_ids, prepared / "gallery.parquet", img_file, f"{split} image")
    crows = match_ids(caption_ids, list(cap.caption_ids), prepared / "captions.parquet", cap_file, f"{split} caption")
    is_fb = img_prov.pop("_is_fallback", None)
    if lazy:
        sd = Path(scratch)
        ncap = len(cap)
        embs = {"image_emb": gather_rows(img(), len(img_ids), irows, sd / "images.npy", str(img_file)),
                "caption_emb": gather_rows(_table_blocks(cap.table, "emb"), ncap, crows, sd / "captions.npy",
                                           str(cap_file)),
                "prompt_emb": gather_rows(_table_blocks(cap.table, "prompt_emb"), ncap, crows, sd / "prompts.npy",
                                          f"{cap_file} prompt_emb"),
                "mask_emb": gather_rows(_table_blocks(cap.table, "mask_emb"), ncap, crows, sd / "masks.npy",
                                        f"{cap_file} mask_emb")}
    else:
        embs = {"image_emb": l2_normalize(img[irows], str(img_file)),
                "caption_emb": l2_normalize(cap.emb[crows], str(cap_file)),
                "prompt_emb": _unit_rows(cap.prompt_emb[crows], f"{cap_file} prompt_emb"),
                "mask_emb": _unit_rows(cap.mask_emb[crows], f"{cap_file} mask_emb")}
    rs = RetrievalSet(
        image_ids=image_ids, caption_ids=caption_ids, **embs,
        n_entities=np.asarray(cap.n_entities, np.int64)[crows],
        t2i_gold=t2i, i2t_gold=i2t,
        info={**info, "source": source, "image_file": str(img_file), "caption_file": str(cap_file),
              "image_provenance": img_prov, "caption_provenance": cap.provenance,
              "fallback_images": int(np.asarray(is_fb)[irows].sum()) if is_fb is not None else None},
    )
    if rs.image_emb.shape[1] != rs.caption_emb.shape[1]:
        raise ValueError(f"image embeddings ({img_file}) have dim {rs.image_emb.shape[1]}, caption embeddings "
                         f"({cap_file}) {rs.caption_emb.shape[1]}: they come from different models")
    rs.info["zero_vectors"] = {"images": _zero_rows(rs.image_emb), "captions": _zero_rows(rs.caption_emb)}
    return rs


def _zero_shot_images(patches: Path, lazy: bool = False) -> tuple[list[str], Any, Path, dict]:
    """(ids, pooled (N, D) or with ``lazy`` a function giving its blocks, the dir, provenance)."""
    from pipeline.stores.shards import ShardReader

    if lazy:
        r = ShardReader(patches)
        prov = dict(r.provenance, fingerprint=r.fingerprint)
        if "is_fallback" in r.datasets:
            prov["_is_fallback"] = r.read_all("is_fallback").astype(bool)

        def blocks() -> Iterator[tuple[int, np.ndarray]]:
            with r:
                yield from r.iter_blocks("pooled")

        return list(r.ids), blocks, patches, prov
    with ShardReader(patches) as r:
        pooled = r.read_all("pooled")  # (N, D)
        prov = dict(r.provenance, fingerprint=r.fingerprint)
        if "is_fallback" in r.datasets:
            prov["_is_fallback"] = r.read_all("is_fallback").astype(bool)
        return list(r.ids), pooled, patches, prov


def _aligned_images(path: Path, lazy: bool = False) -> tuple[list[str], Any, Path, dict]:
    from pipeline.stores.tables import FeatureTable

    t = FeatureTable(path, key="image_id", stage=f"align_retrieval@{path.parent.parent.name}")
    if lazy:
        return [str(k) for k in t.keys], lambda: _table_blocks(t, "emb"), path, dict(t.provenance)
    return [str(k) for k in t.keys], t.stack("emb"), path, dict(t.provenance)


def _captions(d: Path):
    from pipeline.stores.tables import CAPTIONS_FILE, CaptionFeatures

    c = CaptionFeatures(d)
    return c, d / CAPTIONS_FILE
