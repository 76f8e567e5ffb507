"""The test-split retrieval set: ground truth from the prepared manifests, embeddings from caches.

Image embeddings come from the ``patches`` cache (``pooled``), caption / prompt /
masked-caption embeddings from the ``captions`` cache, or both from the ``align_retrieval`` stage's
adapted copies. Every embedding is L2-normalised here. Ids are matched by value and a
mismatch between two files is an :class:`IdMismatchError` naming both files.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.retrieval.index import l2_normalize

SOURCES = ("zero_shot", "aligned")
ALIGNED_IMAGES = "images.parquet"
DISABLED_MARK = "DISABLED.json"


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
            h.update(np.ascontiguousarray(p).tobytes())
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
                       root: str | os.PathLike | None = None) -> RetrievalSet:
    """The ``split`` of ``dataset`` with embeddings from ``source`` (zero_shot | aligned).

    Paths follow the fixed layout: data/prepared/<ds>, features/<ds>/{patches,captions,aligned}.
    """
    from pipeline.paths import project_path

    base = Path(root) if root is not None else project_path(".")
    prepared = base / "data" / "prepared" / dataset
    feats = base / "features" / dataset
    t2i, i2t, info = read_ground_truth(prepared, split)
    caption_ids, image_ids = list(t2i), list(i2t)
    if source == "zero_shot":
        img_ids, img, img_file, img_prov = _zero_shot_images(feats / "patches")
        cap, cap_file = _captions(feats / "captions")
    elif source == "aligned":
        adir = feats / "aligned"
        if (adir / DISABLED_MARK).is_file():
            raise ValueError(f"{adir}: the align_retrieval stage ran with align_retrieval.enabled: false; "
                             "set it to true (or use the zero-shot embeddings)")
        img_ids, img, img_file, img_prov = _aligned_images(adir / ALIGNED_IMAGES)
        cap, cap_file = _captions(adir)
    else:
        raise ValueError(f"embedding source must be one of {', '.join(SOURCES)}, got {source!r}")
    irows = match_ids(image_ids, img_ids, prepared / "gallery.parquet", img_file, f"{split} image")
    crows = match_ids(caption_ids, list(cap.caption_ids), prepared / "captions.parquet", cap_file, f"{split} caption")
    is_fb = img_prov.pop("_is_fallback", None)
    rs = RetrievalSet(
        image_ids=image_ids, caption_ids=caption_ids,
        image_emb=l2_normalize(img[irows], str(img_file)),
        caption_emb=l2_normalize(cap.emb[crows], str(cap_file)),
        prompt_emb=_unit_rows(cap.prompt_emb[crows], f"{cap_file} prompt_emb"),
        mask_emb=_unit_rows(cap.mask_emb[crows], f"{cap_file} mask_emb"),
        n_entities=np.asarray(cap.n_entities, np.int64)[crows],
        t2i_gold=t2i, i2t_gold=i2t,
        info={**info, "source": source, "image_file": str(img_file), "caption_file": str(cap_file),
              "image_provenance": img_prov, "caption_provenance": cap.provenance,
              "fallback_images": int(np.asarray(is_fb)[irows].sum()) if is_fb is not None else None},
    )
    if rs.image_emb.shape[1] != rs.caption_emb.shape[1]:
        raise ValueError(f"image embeddings ({img_file}) have dim {rs.image_emb.shape[1]}, caption embeddings "
                         f"({cap_file}) {rs.caption_emb.shape[1]}: they come from different models")
    rs.info["zero_vectors"] = {"images": int((~rs.image_emb.any(1)).sum()),
                               "captions": int((~rs.caption_emb.any(1)).sum())}
    return rs


def _zero_shot_images(patches: Path) -> tuple[list[str], np.ndarray, Path, dict]:
    from pipeline.stores.shards import ShardReader

    with ShardReader(patches) as r:
        pooled = r.read_all("pooled")  # (N, D)
        prov = dict(r.provenance, fingerprint=r.fingerprint)
        if "is_fallback" in r.datasets:
            prov["_is_fallback"] = r.read_all("is_fallback").astype(bool)
        return list(r.ids), pooled, patches, prov


def _aligned_images(path: Path) -> tuple[list[str], np.ndarray, Path, dict]:
    from pipeline.stores.tables import FeatureTable

    t = FeatureTable(path, key="image_id", stage=f"align_retrieval@{path.parent.parent.name}")
    return [str(k) for k in t.keys], t.stack("emb"), path, dict(t.provenance)


def _captions(d: Path):
    from pipeline.stores.tables import CAPTIONS_FILE, CaptionFeatures

    c = CaptionFeatures(d)
    return c, d / CAPTIONS_FILE
