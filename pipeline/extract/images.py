"""Image extraction drivers of the ``patches`` and ``regions`` stages: DataLoader, shards,
fingerprints, provenance and reports.

Images (patches, regions). The distinct image ids of ``data/prepared/<ds>/images.parquet``
(sorted) are split into HDF5 shards of ``shards.size`` (``pipeline.stores.shards``). ONE
torch DataLoader (``clip.workers`` processes decoding and preprocessing) runs over all the
shards still to do, in batches of ``clip.batch_size`` that never cross a shard boundary, so
decoding overlaps the forward pass and a shard's bytes do not depend on which other shards a
run computes (resume gives identical shards). Unusable images come as the grey fallback
image; with ``images.fallback: zero`` their features are written as zeros; their regions are
always empty (all-masked), whatever the fallback mode.

Fingerprints. A run fingerprint hashes the stage, the model (name, weights sha256 or
random-init, preprocessing), the params that shape the features (execution knobs such as
batch sizes, workers, threads and device are left out, so changing them reuses the cache),
the precision the image tower ran in (``clip.precision``, as used: a bf16 request on a CPU
without bfloat16 instructions runs and is recorded as fp32), the storage dtype of the token
features (``shards.dtype`` for ``patch_tokens`` and region ``feats``; ``pooled`` is always
float32, so retrieval lists do not depend on it) and, for regions, the detector or the
annotations file's sha256. Each shard adds its ids
and one key per image (manifest path and status + sha256 of the image file's bytes), so a
changed, added or removed image recomputes only the shards it touches.

Run reports (``pipeline.extract.common``) add image statuses and fallbacks by reason and
shards written/skipped; a shard that fails verification (damaged, or written before shards
stored digests) is rewritten and listed under ``shards_failed_verification``.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.artifacts import fingerprint, package_versions, sha256_file
from pipeline.data.conll import has_images
from pipeline.data.images import ImagePolicy, ImageReport, is_fallback_status, load_image
from pipeline.extract.common import (PACKAGES, ExtractError, non_negative_int, positive_int, features_dir,
                                     prepared_dir, resolve_device, setup_torch, write_report)
from pipeline.paths import project_path

# ---- the image manifest -------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRecord:
    """One row of images.parquet."""

    image_id: str
    path: str          # relative to the project root; "" if the id was refused
    status: str        # status found by `prepare`
    is_fallback: bool


def read_image_records(prepared: str | os.PathLike) -> list[ImageRecord]:
    """The distinct images of a prepared dataset, sorted by id (ids must be unique)."""
    from pipeline.stores.tables import manifest_rows

    path = Path(prepared) / "images.parquet"
    rows = manifest_rows(path, ["image_id", "path", "status", "is_fallback"])
    recs = sorted((ImageRecord(str(r["image_id"]), str(r["path"] or ""), str(r["status"]), bool(r["is_fallback"]))
                   for r in rows), key=lambda r: r.image_id)
    for a, b in zip(recs, recs[1:]):
        if a.image_id == b.image_id:
            raise ExtractError(f"{path}: image_id {a.image_id!r} appears more than once")
    return recs


def manifest_sha(records: Sequence[ImageRecord]) -> str:
    """Hash of the manifest ids + paths + statuses (reported; shards use per-image keys)."""
    return fingerprint([(r.image_id, r.path, r.status) for r in records])


def image_item_keys(records: Sequence[ImageRecord]) -> dict[str, str]:
    """Per-image shard key: manifest path + status + sha256 of the file's bytes ('' if unreadable)."""
    from pipeline.progress import progress

    keys = {}
    for r in progress(records, desc="hashing images", unit="img", leave=False, mininterval=1.0):
        content = ""
        if r.path:
            try:
                content = sha256_file(project_path(r.path))
            except OSError:
                content = ""
        keys[r.image_id] = hashlib.sha256(f"{r.path}\0{r.status}\0{content}".encode()).hexdigest()
    return keys


# ---- the image DataLoader -----------------------------------------------------------------------

class ImageDataset(Dataset):
    """Decode one image per item (in DataLoader workers): CLIP pixels and/or the raw RGB array."""

    def __init__(self, records: Sequence[ImageRecord], policy: ImagePolicy,
                 preprocess: Callable | None = None, raw: bool = False) -> None:
        self.records = list(records)
        self.policy = policy
        self.preprocess = preprocess
        self.raw = raw

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        loaded = load_image(project_path(rec.path) if rec.path else None, self.policy)
        status = loaded.status if rec.path else (rec.status or loaded.status)
        item: dict[str, Any] = {"id": rec.image_id, "status": status,
                                "is_fallback": bool(loaded.is_fallback or is_fallback_status(status))}
        if self.preprocess is not None:
            item["pixels"] = self.preprocess(loaded.image)  # (3, S, S) float32
        if self.raw:
            item["image"] = np.array(loaded.image, dtype=np.uint8)  # (H, W, 3), writable copy
        return item


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> ids, statuses, is_fallback (B,) bool, pixels (B, 3, S, S), images [ (H, W, 3) ]."""
    out: dict[str, Any] = {
        "ids": [it["id"] for it in items],
        "statuses": [it["status"] for it in items],
        "is_fallback": torch.tensor([it["is_fallback"] for it in items], dtype=torch.bool),
    }
    if items and "pixels" in items[0]:
        out["pixels"] = torch.stack([it["pixels"] for it in items])
    if items and "image" in items[0]:
        out["images"] = [it["image"] for it in items]
    return out


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the forward pass


def make_loader(dataset: Dataset, batches: list[list[int]], workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over fixed ``batches`` (lists of dataset indices), decoding in ``workers``."""
    kw: dict[str, Any] = {}
    if workers > 0:
        kw.update(num_workers=workers, worker_init_fn=_worker_init, prefetch_factor=2, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_images, pin_memory=pin_memory, **kw)


class ShardFeeder:
    """One DataLoader over the shards a run will compute; hands out each shard's batches.

    ``pending``: the id lists of the shards, in the order they will be requested. Batches
    never cross a shard boundary. A request that is not the next pending shard (the shard
    dir changed under us) gets a loader of its own, so results never depend on the plan.
    """

    def __init__(self, dataset: ImageDataset, pending: list[list[str]], batch_size: int, workers: int,
                 pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers
        self.pin_memory = pin_memory
        self._index = {r.image_id: i for i, r in enumerate(dataset.records)}
        self._queue = [list(s) for s in pending]
        batches = [b for s in self._queue for b in self._batches(s)]
        self._it = iter(make_loader(dataset, batches, workers, pin_memory)) if batches else None

    def _batches(self, ids: list[str]) -> list[list[int]]:
        idx = [self._index[i] for i in ids]
        return [idx[j:j + self.batch_size] for j in range(0, len(idx), self.batch_size)]

    def take(self, ids: list[str]) -> list[dict[str, Any]]:
        """The collated batches of one shard (exactly ``ids``, in order)."""
        if self._queue and self._queue[0] == list(ids) and self._it is not None:
            self._queue.pop(0)
            return [next(self._it) for _ in range(len(self._batches(ids)))]
        return list(make_loader(self.dataset, self._batches(list(ids)), self.workers, self.pin_memory))


def fallback_summary(report: ImageReport) -> dict[str, int]:
    """Fallbacks by reason among the counted statuses."""
    return {s: n for s, n in sorted(report.counts.items()) if is_fallback_status(s)}


# ---- image stages: shared driver ----------------------------------------------------------------

@dataclass
class ImageStageSetup:
    """What both image stages need: manifest, policy, CLIP, settings."""

    dataset: str
    records: list[ImageRecord]
    policy: ImagePolicy
    shard_size: int
    batch_size: int
    workers: int
    device: str
    storage: str  # shards.dtype: float32 | float16 | bfloat16 for patch tokens and region features


def _image_setup(dataset: str, params: Mapping[str, Any]) -> ImageStageSetup:
    if dataset not in params["datasets"]:
        raise ExtractError(f"params.yaml: datasets: no dataset named {dataset!r}")
    if not has_images(params["datasets"][dataset].get("format", "twitter")):
        raise ExtractError(f"params.yaml: image_datasets: {dataset!r} is a plain CoNLL dataset without images; "
                           f"remove it from image_datasets (its text stage and training need no image cache)")
    clip = params["clip"]
    return ImageStageSetup(
        dataset=dataset,
        records=read_image_records(prepared_dir(dataset)),
        policy=ImagePolicy.from_params(params["images"]),
        shard_size=positive_int(params["shards"]["size"], "shards.size"),
        batch_size=positive_int(clip["batch_size"], "clip.batch_size"),
        workers=non_negative_int(clip["workers"], "clip.workers"),
        device=resolve_device(clip.get("device", "cpu")),
        storage=storage_dtype_param(params["shards"]),
    )


def _run_image_stage(stage: str, setup: ImageStageSetup, out_dir: Path, run_fp: str, provenance: dict,
                     make_compute: Callable[[ShardFeeder, ImageReport, dict], Callable[[list[str]], dict]],
                     raw: bool, preprocess: Callable | None, shard_index: int, shard_count: int,
                     extra_report: dict | None = None, t_start: float | None = None,
                     dtypes: Mapping[str, str] | None = None) -> dict[str, Any]:
    from pipeline.stores.shards import plan_work, run_shards

    t0 = t_start if t_start is not None else time.perf_counter()
    ids = [r.image_id for r in setup.records]
    keys = image_item_keys(setup.records)
    work = plan_work(ids, setup.shard_size, out_dir, run_fp, shard_index, shard_count, keys)  # verifies each shard once
    dataset = ImageDataset(setup.records, setup.policy, preprocess=preprocess, raw=raw)
    feeder = ShardFeeder(dataset, work.pending, setup.batch_size, setup.workers,
                         pin_memory=setup.device.startswith("cuda"))
    images = ImageReport()
    counters: dict[str, Any] = Counter()
    compute = make_compute(feeder, images, counters)
    stats = run_shards(ids, setup.shard_size, out_dir, run_fp, provenance, compute,
                       shard_index=shard_index, shard_count=shard_count,
                       progress_desc=f"{stage}@{setup.dataset}", item_keys=keys, work=work, dtypes=dtypes)
    report = {
        "stage": stage,
        "dataset": setup.dataset,
        "shard": {"index": shard_index, "count": shard_count},
        "fingerprint": run_fp,
        "manifest_sha": manifest_sha(setup.records),
        "images_in_manifest": len(ids),
        "manifest_fallbacks": dict(sorted(Counter(r.status for r in setup.records if r.is_fallback).items())),
        "images_processed": images.total,
        "fallback_mode": setup.policy.fallback,
        "fallbacks_by_reason": fallback_summary(images),
        "image_statuses": images.to_dict(),
        **{k: v for k, v in stats.items()},
        **dict(sorted(counters.items())),
        **(extra_report or {}),
        "seconds_total": round(time.perf_counter() - t0, 3),
    }
    write_report(setup.dataset, stage, report, shard_index, shard_count)
    return report


def _image_params_part(setup: ImageStageSetup) -> dict[str, Any]:
    return {"images": {k: (list(v) if isinstance(v, tuple) else v) for k, v in setup.policy.__dict__.items()}}


DEFAULT_STORAGE_DTYPE = "float32"  # shards.dtype when a params file has none (the schema's default; params.yaml sets float16)


def storage_dtype_param(shards: Mapping[str, Any]) -> str:
    """``shards.dtype`` (float32 | float16 | bfloat16), checked."""
    from pipeline.stores.shards import check_storage_dtype

    try:
        return check_storage_dtype(str(shards.get("dtype", DEFAULT_STORAGE_DTYPE)))
    except ValueError as e:
        raise ExtractError(f"params.yaml: {e}") from None


def features_part(precision: Mapping[str, Any], storage: Mapping[str, str]) -> dict[str, Any]:
    """What changes the stored features besides model and images: the precision used, the storage dtypes."""
    return {"precision": str(precision["used"]), "storage": dict(sorted(storage.items()))}


def _precision_report(bundle: Any) -> dict[str, Any]:
    p = dict(bundle.precision)
    return {"precision": p, "precision_fallbacks": int(bool(p.get("fallback")))}


# ---- patches ------------------------------------------------------------------------------------

# Version of what an image shard holds, part of every run fingerprint. The shard dirs are
# DVC `persist` outputs, so a code change reruns the stage but keeps every shard whose
# fingerprint still matches: bump this when a change to this module, the encoders or the
# image loader changes the features, and the next run recomputes every shard.
FEATURES_VERSION = 1


def patches_fingerprint(clip_provenance: Mapping[str, Any], image_params: Mapping[str, Any],
                        features: Mapping[str, Any]) -> str:
    """Run fingerprint of a patches cache: model + weights + preprocessing + image params + precision/storage."""
    return fingerprint("patches", FEATURES_VERSION, dict(clip_provenance), dict(image_params), dict(features))


def extract_patches(dataset: str, params: Mapping[str, Any], shard_index: int = 0, shard_count: int = 1,
                    out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``features/<ds>/patches/shard-*.h5``: pooled (N, D), patch_tokens (N, P, W), is_fallback (N,)."""
    from pipeline.encoders.clip import encode_images, load_clip

    t0 = time.perf_counter()
    setup = _image_setup(dataset, params)
    setup_torch(params["clip"].get("threads"))
    bundle = load_clip(params["clip"], device=setup.device)
    zero = setup.policy.fallback == "zero"
    image_part = _image_params_part(setup)
    dtypes = {"pooled": "float32", "patch_tokens": setup.storage}  # pooled: float32 always (retrieval)
    feat = features_part(bundle.precision, dtypes)
    run_fp = patches_fingerprint(bundle.provenance, image_part, feat)
    provenance = {"stage": "patches", "dataset": dataset, "clip": bundle.provenance, "params": image_part,
                  "precision": dict(bundle.precision), "storage": feat["storage"],
                  "fallback": "zero features" if zero else "grey image encoded",
                  "packages": package_versions(*PACKAGES), "fingerprint": run_fp}
    out = Path(out_dir) if out_dir else features_dir(dataset, "patches")

    def make_compute(feeder: ShardFeeder, images: ImageReport, counters: dict) -> Callable:
        def compute(ids: list[str]) -> dict[str, np.ndarray]:
            pooled, tokens, fallback = [], [], []
            for b in feeder.take(ids):
                p, t = encode_images(bundle, b["pixels"])  # (B, D), (B, P, W)
                fb = b["is_fallback"]
                if zero and bool(fb.any()):
                    p = p.masked_fill(fb[:, None], 0.0)
                    t = t.masked_fill(fb[:, None, None], 0.0)
                pooled.append(p)
                tokens.append(t)
                fallback.append(fb)
                for i, s in zip(b["ids"], b["statuses"]):
                    images.add(i, s)
            return {"pooled": torch.cat(pooled).numpy(), "patch_tokens": torch.cat(tokens).numpy(),
                    "is_fallback": torch.cat(fallback).numpy()}
        return compute

    extra = {"model": bundle.provenance["model"], "weights": bundle.provenance["weights"]["sha256"],
             "batch_size": setup.batch_size, "workers": setup.workers, "device": setup.device,
             "threads": torch.get_num_threads(), "storage": feat["storage"], **_precision_report(bundle)}
    return _run_image_stage("patches", setup, out, run_fp, provenance, make_compute, raw=False,
                            preprocess=bundle.preprocess, shard_index=shard_index, shard_count=shard_count,
                            extra_report=extra, t_start=t0, dtypes=dtypes)


# ---- regions ------------------------------------------------------------------------------------

def annotations_file(ds_params: Mapping[str, Any], dataset: str) -> Path:
    """``<datasets.<ds>.dir>/<datasets.<ds>.annotations>``; a clear error if none is set."""
    rel = ds_params.get("annotations", "") or ""
    if not rel:
        raise ExtractError(f"params.yaml: detector.source is 'annotations' but datasets.{dataset}.annotations is "
                           f"empty; name the dataset's boxes.jsonl or use detector.source: fasterrcnn")
    from pipeline.paths import safe_join

    return safe_join(project_path(ds_params["dir"]), str(rel), what=f"datasets.{dataset}.annotations")


def regions_fingerprint(clip_provenance: Mapping[str, Any], region_source: Mapping[str, Any],
                        image_params: Mapping[str, Any], features: Mapping[str, Any]) -> str:
    """Run fingerprint of a regions cache: CLIP + detector (or annotations sha) + image params + precision/storage."""
    return fingerprint("regions", FEATURES_VERSION, dict(clip_provenance), dict(region_source), dict(image_params),
                       dict(features))


def image_regions(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int,
                  preprocess: Callable, counters: dict) -> tuple[list[torch.Tensor], dict[str, np.ndarray]]:
    """Clip, cut to K, crop and preprocess the regions of one (H, W, 3) image.

    Returns the crop pixel tensors (n, each (3, S, S)) and the padded slot arrays without
    features: boxes (K, 4) in [0, 1], labels (K,), scores (K,), mask (K,).
    """
    from pipeline.encoders.detector import clip_boxes, crop_box, normalise_boxes

    h, w = image.shape[:2]
    clipped, keep = clip_boxes(boxes, w, h)
    counters["boxes_dropped_empty"] += int((~keep).sum())
    clipped, labels, scores = clipped[keep], np.asarray(labels)[keep], np.asarray(scores)[keep]
    if len(clipped) > k:
        counters["boxes_cut_topk"] += len(clipped) - k
        clipped, labels, scores = clipped[:k], labels[:k], scores[:k]
    crops = []
    for box in clipped:
        left, top, right, bottom = crop_box(box)
        crops.append(preprocess(Image.fromarray(image[top:bottom, left:right])))
    n = len(clipped)
    slots = {"boxes": np.zeros((k, 4), np.float32), "labels": np.zeros((k,), np.int64),
             "scores": np.zeros((k,), np.float32), "mask": np.zeros((k,), bool)}
    if n:
        slots["boxes"][:n] = normalise_boxes(clipped, w, h)
        slots["labels"][:n] = labels
        slots["scores"][:n] = scores
        slots["mask"][:n] = True
    return crops, slots


def extract_regions(dataset: str, params: Mapping[str, Any], shard_index: int = 0, shard_count: int = 1,
                    out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``features/<ds>/regions/shard-*.h5``: feats (N, K, D), boxes (N, K, 4), labels, scores, mask, is_fallback."""
    from pipeline.encoders.clip import encode_pooled, load_clip
    from pipeline.encoders.detector import (annotations_sha, detect, detector_settings, load_detector,
                                            read_annotations)

    t0 = time.perf_counter()
    setup = _image_setup(dataset, params)
    det_params = params["detector"]
    settings = detector_settings(det_params)
    k = settings["topk"]
    crop_bs = positive_int(det_params["crop_batch_size"], "detector.crop_batch_size")
    setup_torch(params["clip"].get("threads"))
    bundle = load_clip(params["clip"], device=setup.device)
    d = bundle.embed_dim
    detector = annotations = None
    if settings["source"] == "fasterrcnn":
        detector = load_detector(det_params, device=setup.device)
        source = detector.provenance
    else:
        ann_path = annotations_file(params["datasets"][dataset], dataset)
        annotations = read_annotations(ann_path)
        source = {"source": "annotations", "topk": k, "file": str(params["datasets"][dataset]["annotations"]),
                  "sha256": annotations_sha(ann_path)}
    image_part = _image_params_part(setup)
    dtypes = {"feats": setup.storage}
    feat = features_part(bundle.precision, dtypes)
    run_fp = regions_fingerprint(bundle.provenance, source, image_part, feat)
    provenance = {"stage": "regions", "dataset": dataset, "clip": bundle.provenance, "regions": source,
                  "params": image_part, "precision": dict(bundle.precision), "storage": feat["storage"], "boxes": "normalised x1 y1 x2 y2 in [0, 1]",
                  "labels": "torchvision COCO category ids", "fallback": "no regions (all masked)",
                  "packages": package_versions(*PACKAGES), "fingerprint": run_fp}
    out = Path(out_dir) if out_dir else features_dir(dataset, "regions")
    extra: dict[str, Any] = {"source": settings["source"], "topk": k, "batch_size": setup.batch_size,
                             "crop_batch_size": crop_bs, "workers": setup.workers, "device": setup.device,
                             "storage": feat["storage"], **_precision_report(bundle)}
    if annotations is not None:
        known = {r.image_id for r in setup.records}
        extra["annotated_images_not_in_manifest"] = sum(1 for i in annotations if i not in known)

    def make_compute(feeder: ShardFeeder, images: ImageReport, counters: dict) -> Callable:
        def compute(ids: list[str]) -> dict[str, np.ndarray]:
            rows: list[dict[str, np.ndarray]] = []
            fallback: list[bool] = []
            for b in feeder.take(ids):
                fb = b["is_fallback"].tolist()
                dets: dict[int, tuple] = {}
                if detector is not None:
                    live = [j for j, f in enumerate(fb) if not f]
                    tensors = [torch.from_numpy(b["images"][j]).permute(2, 0, 1).float().div_(255.0) for j in live]
                    dets = dict(zip(live, detect(detector, tensors)))
                crops: list[torch.Tensor] = []
                owners: list[tuple[int, int]] = []  # (row, slot) of each crop
                for j, (image_id, image) in enumerate(zip(b["ids"], b["images"])):
                    images.add(image_id, b["statuses"][j])
                    if fb[j]:
                        boxes, labels, scores = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
                    elif detector is not None:
                        boxes, labels, scores = dets[j]
                    elif image_id in annotations:
                        a = annotations[image_id]
                        boxes, labels, scores = a.boxes, a.labels, np.ones(len(a.labels), np.float32)
                    else:
                        counters["images_without_annotations"] += 1
                        boxes, labels, scores = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
                    c, slots = image_regions(image, boxes, labels, scores, k, bundle.preprocess, counters)
                    slots["feats"] = np.zeros((k, d), np.float32)
                    rows.append(slots)
                    fallback.append(fb[j])
                    crops.extend(c)
                    owners.extend((len(rows) - 1, slot) for slot in range(len(c)))
                    counters["regions"] += len(c)
                    counters["images_without_regions"] += int(len(c) == 0)
                # CLIP embedding of every crop of the batch, crop_batch_size at a time
                start = 0
                while start < len(crops):
                    emb = encode_pooled(bundle, torch.stack(crops[start:start + crop_bs])).numpy()  # (c, D)
                    for e, (r, slot) in zip(emb, owners[start:start + crop_bs]):
                        rows[r]["feats"][slot] = e
                    start += crop_bs
            return {name: np.stack([r[name] for r in rows]) for name in ("feats", "boxes", "labels", "scores", "mask")} | {
                "is_fallback": np.asarray(fallback, dtype=bool)}
        return compute

    return _run_image_stage("regions", setup, out, run_fp, provenance, make_compute, raw=True, preprocess=None,
                            shard_index=shard_index, shard_count=shard_count, extra_report=extra, t_start=t0,
                            dtypes=dtypes)
