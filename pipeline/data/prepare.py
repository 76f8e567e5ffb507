"""Turn one raw dataset into prepared manifests (Parquet) and a report.

MNER datasets give ``samples.parquet``; retrieval datasets give ``captions.parquet``,
``gallery.parquet`` and ``meta.json``; both give ``images.parquet`` (one row per distinct
image: id, path relative to the project root, load status); the report it returns goes to
``reports/<ds>/prepare.json``.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pipeline.progress import progress

from pipeline.artifacts import fingerprint, package_versions, sha256_file, write_json, write_parquet
from pipeline.data.agree import SHOW, read_agree
from pipeline.data.conll import has_images as format_has_images
from pipeline.data.conll import read_conll
from pipeline.data.images import ImagePolicy, ImageReport, is_fallback_status, load_image
from pipeline.paths import PathEscapeError, project_path, project_root, safe_join

SPLITS = ("train", "valid", "test")


def _display_path(p: Path) -> str:
    """Path relative to the project root when it lies inside it, else absolute."""
    root = project_root()
    try:
        return str(p.resolve().relative_to(root))
    except ValueError:
        return str(p.resolve())


def image_rows(refs: Mapping[str, tuple[str | os.PathLike, str]], policy: ImagePolicy) -> tuple[list[dict], ImageReport]:
    """Resolve and check every image. ``refs``: image_id -> (base folder, path relative to it)."""
    rows, report = [], ImageReport()
    for image_id in progress(sorted(refs), desc="checking images", unit="img", leave=False):
        base, rel = refs[image_id]
        try:
            path = safe_join(base, rel, what=f"image {image_id!r}")
        except PathEscapeError:
            status, shown = "refused", ""
        else:
            status, shown = load_image(path, policy).status, _display_path(path)
        # the content hash makes this manifest change whenever an image's bytes change: the
        # patches and regions stages depend on the manifest, not on the raw image folder
        digest = sha256_file(path) if shown and Path(path).is_file() else ""
        report.add(image_id, status)
        rows.append({"image_id": image_id, "path": shown, "status": status,
                     "is_fallback": is_fallback_status(status), "sha256": digest})
    return rows, report


def _provenance(ds_name: str, ds: Mapping, policy: ImagePolicy) -> dict:
    # the dataset's overrides belong to other stages: left out, so changing one keeps these bytes
    dataset = {k: v for k, v in _plain(ds).items() if k != "overrides"}
    prov = {"stage": "prepare", "dataset": ds_name, "params": {"dataset": dataset, "images": policy.__dict__},
            "packages": package_versions("pyarrow", "pillow")}
    ann = ds.get("annotations") or ""
    if ann:  # shipped boxes (regions with detector.source: annotations): their bytes key the manifest too
        try:
            path = safe_join(project_path(ds["dir"]), str(ann), what=f"datasets.{ds_name}.annotations")
        except PathEscapeError:
            path = None
        prov["annotations_sha256"] = sha256_file(path) if path is not None and path.is_file() else ""
    return prov


def _plain(m: Any) -> Any:
    return {k: _plain(v) for k, v in m.items()} if isinstance(m, Mapping) else m


def prepare_mner(ds_name: str, ds: Mapping, policy: ImagePolicy, out: Path) -> dict:
    """Read the split files of an MNER dataset and write its manifests under ``out``.

    ``format: conll`` (text only, e.g. WNUT-17) has no images: none are looked for,
    ``images.parquet`` has zero rows, and ``images`` / ``other_tag`` are not read.
    """
    root = project_path(ds["dir"])
    fmt = ds["format"]
    has_images = format_has_images(fmt)
    other_tag = ds["other_tag"] if has_images else "MISC"  # conll: not read (the reader ignores it)
    rows, skipped, counts = [], {}, {}
    for split in SPLITS:
        if split not in ds["splits"]:
            raise KeyError(f"params.yaml: datasets.{ds_name}.splits has no {split!r} file")
        path = root / ds["splits"][split]
        res = read_conll(path, fmt=fmt, other_tag=other_tag, on_bad_line=ds["on_bad_line"])
        if not res.samples:
            skips = f" ({len(res.skipped)} skipped as bad lines)" if res.skipped else ""
            raise ValueError(f"{_display_path(path)}: the {split} split has no sentences{skips}; every split needs at least one "
                             f"(params.yaml datasets.{ds_name}.splits.{split})")
        skipped[split] = res.skipped
        counts[split] = res.counts
        for i, s in enumerate(res.samples):
            rows.append({"split": split, "sample_id": f"{split}-{i:06d}", "image_id": s.image_id,
                         "tokens": s.tokens, "tags": s.tags, "line": s.line})
    warnings = [w for w in [shared_images(rows, ds_name, ds.get("shared_images", "warn"))] if w]
    refs: dict[str, tuple[Path, str]] = {}
    if has_images:
        # twitter: IMGID is an id under <dir>/<images>; newsmkg: a path relative to <dir> (+ .jpg)
        base = root / ds["images"] if fmt == "twitter" else root
        refs = {r["image_id"]: (base, r["image_id"] + ".jpg") for r in rows}
    images, img_report = image_rows(refs, policy)
    prov = _provenance(ds_name, ds, policy)
    samples = pa.Table.from_pylist(rows, schema=pa.schema([
        ("split", pa.string()), ("sample_id", pa.string()), ("image_id", pa.string()),
        ("tokens", pa.list_(pa.string())), ("tags", pa.list_(pa.string())), ("line", pa.int64())]))
    prov["fingerprint"] = fingerprint(prov["params"], rows)
    write_parquet(samples, out / "samples.parquet", prov)
    _write_images(images, out, prov)
    return {"dataset": ds_name, "kind": "mner", "has_images": has_images,
            "samples": {s: counts[s] for s in SPLITS},
            "blank_tokens": sum(counts[s]["blank_tokens"] for s in SPLITS),
            "skipped": skipped, "warnings": warnings, "images": img_report.to_dict()}


def shared_images(rows: list[dict], ds_name: str, policy: str) -> dict | None:
    """The warning for IMGIDs used in more than one split (leakage), or an error if ``policy`` is raise."""
    splits: dict[str, set[str]] = {}
    for r in rows:
        if r["image_id"]:
            splits.setdefault(r["image_id"], set()).add(r["split"])
    both = sorted(i for i, s in splits.items() if len(s) > 1)
    if not both:
        return None
    pairs = Counter("+".join(s for s in SPLITS if s in splits[i]) for i in both)
    message = (f"{len(both)} image ids appear in more than one split "
               f"({', '.join(f'{k}: {v}' for k, v in sorted(pairs.items()))}); first: {', '.join(both[:SHOW])}")
    if policy == "raise":
        raise ValueError(f"datasets.{ds_name}: {message} (shared_images: raise; set it to warn to accept them)")
    return {"reason": "image_in_two_splits", "count": len(both), "by_splits": dict(sorted(pairs.items())),
            "message": message, "first": both[:SHOW]}


def prepare_retrieval(ds_name: str, ds: Mapping, policy: ImagePolicy, out: Path) -> dict:
    """Read AGREE's files of a retrieval dataset and write its manifests under ``out``."""
    root = project_path(ds["dir"])
    opt = lambda key: root / ds[key] if ds.get(key) else None  # noqa: E731
    data = read_agree(train=opt("train"), test_texts=opt("test_texts"), test_images=opt("test_images"),
                      test_entities=opt("test_entities"), on_bad_line=ds["on_bad_line"])
    for key, n in (("test_texts", data.counts["test_captions"]), ("test_images", data.counts["test_images"]),
                   ("train", data.counts["train_captions"] if ds.get("train") else 1)):
        if not n:
            raise ValueError(f"{_display_path(root / ds[key])}: no usable records ({data.counts['skipped']} skipped); "
                             f"the {key.replace('_', ' ')} split cannot be empty (params.yaml datasets.{ds_name}.{key})")
    refs: dict[str, tuple[Path, str]] = {}
    for g in data.gallery:
        # train records name their file ("image"), relative to the dataset folder; test images are <images>/<id>.jpg
        refs.setdefault(g.image_id, (root, g.file) if g.file else (root / ds["images"], g.image_id + ".jpg"))
    images, img_report = image_rows(refs, policy)
    prov = _provenance(ds_name, ds, policy)
    captions, gallery = data.caption_rows(), data.gallery_rows()
    prov["fingerprint"] = fingerprint(prov["params"], captions, gallery)
    write_parquet(pa.Table.from_pylist(captions, schema=pa.schema([
        ("split", pa.string()), ("caption_id", pa.string()), ("text", pa.string()),
        ("image_ids", pa.list_(pa.string())), ("entities", pa.list_(pa.string()))])), out / "captions.parquet", prov)
    write_parquet(pa.Table.from_pylist(gallery, schema=pa.schema([
        ("split", pa.string()), ("image_id", pa.string()), ("caption_ids", pa.list_(pa.string()))])),
        out / "gallery.parquet", prov)
    write_json(out / "meta.json", {"dataset": ds_name, **data.meta()})
    _write_images(images, out, prov)
    return {"dataset": ds_name, "kind": "retrieval", **data.report(), "images": img_report.to_dict()}


def _write_images(rows: list[dict], out: Path, prov: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.string()), ("path", pa.string()), ("status", pa.string()), ("is_fallback", pa.bool_()),
        ("sha256", pa.string())]))
    write_parquet(table, out / "images.parquet", {**prov, "fingerprint": fingerprint(prov["fingerprint"], rows)})


def prepare_dataset(ds_name: str, ds: Mapping, images_params: Mapping, out: str | os.PathLike) -> dict[str, Any]:
    """Prepare one dataset (either kind); writes its manifests under ``out`` and returns the report."""
    out = project_path(out)
    policy = ImagePolicy.from_params(images_params)
    kind = ds["kind"]
    if kind == "mner":
        report = prepare_mner(ds_name, ds, policy, out)
    elif kind == "retrieval":
        report = prepare_retrieval(ds_name, ds, policy, out)
    else:
        raise ValueError(f"params.yaml: datasets.{ds_name}.kind is {kind!r}; expected 'mner' or 'retrieval'")
    return report
