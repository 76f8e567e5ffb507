"""Atomic writes, hashes, fingerprints and provenance shared by every artifact.

Every artifact is written to a temporary name beside its final path and renamed into
place, so a killed run never leaves a half-written file that looks whole. Provenance
is a plain dict (JSON-serialisable) with no timestamps, so the same inputs give the same
bytes; timings go to the per-stage report instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

RANDOM_INIT = "random-init"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(*parts: Any) -> str:
    """sha256 over the canonical JSON of ``parts``."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()


def fingerprint_stream(items: Iterable[Any]) -> str:
    """``fingerprint(list(items))``, computed as the items stream by (the same digest; no list is kept)."""
    h = hashlib.sha256(b"[[")
    for i, item in enumerate(items):
        h.update((b"," if i else b"") + canonical_json(item).encode("utf-8"))
    h.update(b"]]")
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_id(checkpoint: str | None) -> str:
    """``random-init`` or the sha256 of the checkpoint file (file or directory of files)."""
    if not checkpoint or checkpoint == RANDOM_INIT:
        return RANDOM_INIT
    p = Path(checkpoint)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(p)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir():
            # a directory cannot be replaced in one rename: move the old one aside first,
            # so the final name is missing only between two renames
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def temp_leftovers(directory: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Temp files a killed writer left in ``directory`` (what :func:`atomic_path` names
    ``.<final name>.<pid>.tmp``), for final names matching the glob ``pattern``."""
    d = Path(directory)
    return sorted(p for p in d.glob(f".{pattern}.*.tmp") if p.is_file()) if d.is_dir() else []


def report_path(dataset: str, stage: str, part: str = "") -> Path:
    """``reports/<dataset>/<stage>[-<part>].json``: one stage run's report (counts, fallbacks, timings).

    Reports live outside the caches, so their timings never change a cache's hash and never
    make a downstream stage rerun; dvc.yaml declares them as (cached) outputs, so `dvc pull`
    restores them and a pulled clone is complete.
    """
    from pipeline.paths import project_path

    return project_path(f"reports/{dataset}/{stage}{'-' + part if part else ''}.json")


def details_path(metrics_path: str | os.PathLike) -> Path:
    """Where the full report behind a small metrics file goes: ``metrics/<ds>/<name>.json`` ->
    ``reports/<ds>/<name>.json`` (beside the stage reports, out of ``dvc metrics show``'s way);
    a metrics file elsewhere gets ``<name>_details.json`` beside it."""
    p = Path(metrics_path)
    if p.parent.parent.name == "metrics":
        return p.parents[2] / "reports" / p.parent.name / p.name
    return p.with_name(f"{p.stem}_details{p.suffix}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)


def write_parquet(table: "pyarrow.Table", path: str | os.PathLike, provenance: dict) -> Path:  # noqa: F821
    """Atomically write a pyarrow table with ``provenance`` in its schema metadata."""
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[b"provenance"] = canonical_json(provenance).encode("utf-8")
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_provenance(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"provenance")
    return json.loads(raw) if raw else {}


def package_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not-installed"
    return out
