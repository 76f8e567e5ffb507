"""HDF5 feature shards: planning, atomic deterministic writes, resume, and a lazy reader.

A shard dir holds ``shard-00000.h5``, ``shard-00001.h5``, ... Each shard has a dataset
``ids`` (N,) of UTF-8 strings and one dataset per feature array with N rows, chunked so
that one item is one chunk read. Attributes: ``provenance`` (canonical JSON),
``fingerprint`` (this shard's: the run fingerprint + its ids), ``run_fingerprint``
(the caller's hash of model + weights + preprocessing + params + inputs), ``count`` and
``complete`` (written last). No timestamps: the same inputs give the same bytes.

A shard counts as done only if it opens, is complete, holds ``count`` ids and its
fingerprint matches; anything else (missing, truncated, foreign, stale) is recomputed.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.artifacts import atomic_path, canonical_json, fingerprint as hash_parts

SHARD_GLOB = "shard-*.h5"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.h5$")
_TMP_RE = re.compile(r"^\.shard-(\d{5,})\.h5\..+\.tmp$")
_LIBVER = ("v110", "v110")  # fixed-array chunk index (O(1) chunk lookup); readable by HDF5 >= 1.10
_STR = h5py.string_dtype("utf-8")


class ShardError(RuntimeError):
    """A shard dir is missing, empty or inconsistent."""


# ---- planning -------------------------------------------------------------------------

def plan_shards(ids: Sequence[str], size: int) -> list[list[str]]:
    """Split ``ids`` (kept in order) into consecutive chunks of ``size``."""
    if int(size) != size or size < 1:
        raise ValueError(f"shards.size must be a positive integer, got {size!r}")
    ids = list(ids)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def select_shards(n_shards: int, shard_index: int, shard_count: int) -> list[int]:
    """Shard numbers this worker owns: ``shard_index, shard_index + shard_count, ...``."""
    if shard_count < 1:
        raise ValueError(f"shard count must be >= 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard index must be in 0..{shard_count - 1}, got {shard_index}")
    return list(range(shard_index, n_shards, shard_count))


def parse_shard_arg(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (shard index i of n workers) into ``(i, n)``."""
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"--shard {text!r}: COUNT must be >= 1")
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: INDEX must be in 0..{n - 1}")
    return i, n


def resolve_shard_arg(text: str | None) -> tuple[int, int]:
    """``--shard i/n`` if given, else torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    if text:
        return parse_shard_arg(text)
    world = os.environ.get("WORLD_SIZE")
    if world and int(world) > 1:
        return parse_shard_arg(f"{os.environ.get('RANK', '0')}/{world}")
    return 0, 1


def shard_path(out_dir: str | os.PathLike, index: int) -> Path:
    """``out_dir/shard-00000.h5`` for index 0."""
    return Path(out_dir) / f"shard-{int(index):05d}.h5"


def shard_files(out_dir: str | os.PathLike) -> list[Path]:
    """Shard files in ``out_dir``, in index order (temp files excluded)."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _SHARD_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def shard_index_of(path: str | os.PathLike) -> int | None:
    m = _SHARD_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def temp_leftovers(out_dir: str | os.PathLike) -> list[Path]:
    """Temporary shard files left by a killed writer."""
    d = Path(out_dir)
    return sorted(p for p in d.iterdir() if _TMP_RE.match(p.name)) if d.is_dir() else []


def shard_fingerprint(run_fingerprint: str, ids: Sequence[str], item_keys: Sequence[str] | None = None) -> str:
    """A shard's own fingerprint: the run fingerprint plus its ids (and optional per-item keys)."""
    parts: list[Any] = ["shard", run_fingerprint, list(ids)]
    if item_keys is not None:
        parts.append(list(item_keys))
    return hash_parts(*parts)


# ---- writing ----------------------------------------------------------------------------

def _check_arrays(ids: Sequence[str], arrays: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    out = {}
    if "ids" in arrays:
        raise ValueError(f"{where}: 'ids' is reserved for the item ids; rename that array")
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == object or a.dtype.kind in "OUSV":
            raise ValueError(f"{where}: array {name!r} has dtype {a.dtype}; only numeric/bool arrays are stored")
        if a.ndim == 0 or a.shape[0] != len(ids):
            raise ValueError(f"{where}: array {name!r} has shape {a.shape}; its first dim must be the {len(ids)} items")
        out[name] = np.ascontiguousarray(a)
    return out


def write_shard(
    path: str | os.PathLike,
    ids: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    fingerprint: str,
    *,
    run_fingerprint: str | None = None,
    compression: str | None = None,
    compression_opts: int | None = None,
) -> None:
    """Write one shard atomically and deterministically (same inputs -> same bytes).

    ``arrays``: name -> (N, ...) array; each item is one chunk. ``compression``: None
    (default), ``"lzf"`` or ``"gzip"`` (``compression_opts`` = level). ``run_fingerprint``
    (default: hash of ``provenance``) is what every shard of one cache must share.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{path}: duplicate ids in one shard: {dup}")
    if compression not in (None, "lzf", "gzip"):
        raise ValueError(f"{path}: compression must be none, 'lzf' or 'gzip', got {compression!r}")
    arrays = _check_arrays(ids, arrays, str(path))
    prov_json = canonical_json(dict(provenance))
    run_fp = run_fingerprint or hash_parts("provenance", json.loads(prov_json))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=_LIBVER, track_order=False) as f:
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR, track_times=False)
            for name in sorted(arrays):
                a = arrays[name]
                kw: dict[str, Any] = {"track_times": False}
                if a.size and (a.ndim >= 2 or compression):
                    kw["chunks"] = (1, *a.shape[1:]) if a.ndim >= 2 else (a.shape[0],)
                    if compression:
                        kw["compression"] = compression
                        if compression_opts is not None:
                            kw["compression_opts"] = compression_opts
                f.create_dataset(name, data=a, **kw)
            f.attrs["provenance"] = prov_json
            f.attrs["fingerprint"] = str(fingerprint)
            f.attrs["run_fingerprint"] = run_fp
            f.attrs["count"] = np.int64(len(ids))
            f.attrs["complete"] = True  # last: a file without it was not closed cleanly


def _attr_str(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def shard_is_done(path: str | os.PathLike, fingerprint: str) -> bool:
    """True only if ``path`` is a complete shard with this fingerprint. Never raises."""
    try:
        p = Path(path)
        if not p.is_file():
            return False
        with h5py.File(p, "r") as f:
            a = f.attrs
            if not bool(a.get("complete", False)):
                return False
            if _attr_str(a.get("fingerprint", "")) != fingerprint:
                return False
            count = int(a.get("count", -1))
            if "ids" not in f or f["ids"].shape != (count,):
                return False
            return all(isinstance(f[k], h5py.Dataset) and f[k].shape[:1] == (count,) for k in f.keys())
    except Exception:  # truncated, not HDF5, unreadable: not done
        return False


# ---- the resumable driver -----------------------------------------------------------------

def run_shards(
    ids: Sequence[str],
    size: int,
    out_dir: str | os.PathLike,
    fingerprint: str,
    provenance: Mapping[str, Any],
    compute: Callable[[list[str]], Mapping[str, np.ndarray]],
    shard_index: int = 0,
    shard_count: int = 1,
    progress_desc: str = "shards",
    *,
    item_keys: Mapping[str, str] | None = None,
    compression: str | None = None,
    compression_opts: int | None = None,
) -> dict[str, Any]:
    """Compute and write every shard this worker owns that is not already done.

    ``fingerprint``: the caller's run fingerprint (model, weights sha, preprocessing,
    params); each shard adds its ids (and ``item_keys[id]``, e.g. a file hash, if given),
    so changing one id rewrites only its shard. ``compute(ids) -> {name: (len(ids), ...)}``.
    Shard files beyond the plan are deleted (every worker; nobody writes there); temp
    leftovers only when ``shard_count == 1`` (other workers may be writing theirs).
    Returns stats: shards_total, shards_selected, shards_written, shards_skipped,
    shards_deleted, items, seconds, items_per_s.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(ids, size)
    selected = select_shards(len(plan), shard_index, shard_count)

    deleted = 0
    for p in shard_files(out):
        if shard_index_of(p) >= len(plan):
            p.unlink(missing_ok=True)
            deleted += 1
    if shard_count == 1:
        for p in temp_leftovers(out):
            p.unlink(missing_ok=True)

    todo: list[tuple[int, str]] = []
    skipped = 0
    for k in selected:
        keys = [item_keys[i] for i in plan[k]] if item_keys is not None else None
        sfp = shard_fingerprint(fingerprint, plan[k], keys)
        if shard_is_done(shard_path(out, k), sfp):
            skipped += 1
        else:
            todo.append((k, sfp))

    t0 = time.perf_counter()
    items = 0
    with tqdm(total=sum(len(plan[k]) for k, _ in todo), desc=progress_desc, unit="item",
              dynamic_ncols=True, mininterval=1.0) as bar:
        for k, sfp in todo:
            arrays = compute(list(plan[k]))
            write_shard(shard_path(out, k), plan[k], arrays, provenance, sfp, run_fingerprint=fingerprint,
                        compression=compression, compression_opts=compression_opts)
            items += len(plan[k])
            bar.update(len(plan[k]))
    seconds = time.perf_counter() - t0
    return {
        "shards_total": len(plan),
        "shards_selected": len(selected),
        "shards_written": len(todo),
        "shards_skipped": skipped,
        "shards_deleted": deleted,
        "items": items,
        "seconds": round(seconds, 3),
        "items_per_s": round(items / seconds, 3) if seconds > 0 and items else 0.0,
    }


# ---- reading ------------------------------------------------------------------------------

def _missing_message(d: Path, stage: str | None, what: str) -> str:
    if stage is None and d.name in ("patches", "regions"):
        stage = f"{d.name}@{d.parent.name}"
    hint = f"; it is written by the `{stage.split('@')[0]}` stage (run `dvc repro {stage}`)" if stage else ""
    return f"{d}: {what}{hint}"


class ShardReader:
    """Read a shard dir by item id: ids at open, rows lazily, one h5 handle per process.

    ``get(id)`` reads one row of each dataset (one chunk each), so memory stays flat as
    the cache grows. Handles are opened on first use and reopened after a fork (pid
    change); they are not pickled, so a reader can go into DataLoader workers.
    ``max_open`` bounds the open files (LRU).
    """

    def __init__(self, dir: str | os.PathLike, stage: str | None = None, max_open: int = 64) -> None:
        d = Path(dir)
        if d.is_file() and d.suffix == ".h5":
            files = [d]
        else:
            if not d.is_dir():
                raise ShardError(_missing_message(d, stage, "shard dir not found"))
            files = shard_files(d)
            if not files:
                raise ShardError(_missing_message(d, stage, f"no {SHARD_GLOB} files"))
        self.dir = d
        self.files: list[Path] = files
        self.max_open = max(1, int(max_open))
        self._ids: list[str] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._provenance: dict | None = None
        self._run_fp: str | None = None
        self.datasets: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for s, p in enumerate(files):
            try:
                with h5py.File(p, "r") as f:
                    if not bool(f.attrs.get("complete", False)):
                        raise ShardError(f"{p}: shard is incomplete (not marked complete); rerun its stage")
                    ids = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in f["ids"][()]]
                    run_fp = _attr_str(f.attrs.get("run_fingerprint", ""))
                    layout = {k: (f[k].shape[1:], f[k].dtype) for k in f.keys() if k != "ids"}
                    if s == 0:
                        self._provenance = json.loads(_attr_str(f.attrs.get("provenance", "{}")))
                        self._run_fp = run_fp
                        self.datasets = layout
                    else:
                        if run_fp != self._run_fp:
                            raise ShardError(
                                f"{p}: written with fingerprint {run_fp[:12]}, but {files[0].name} with "
                                f"{(self._run_fp or '')[:12]}: the shards come from different runs "
                                f"(model, weights, params or inputs differ); rerun the stage that writes {d}")
                        if layout != self.datasets:
                            raise ShardError(f"{p}: datasets {layout} differ from {files[0].name}: {self.datasets}")
            except ShardError:
                raise
            except Exception as e:
                raise ShardError(f"{p}: cannot read shard ({type(e).__name__}: {e}); rerun the stage that writes it") from e
            for row, i in enumerate(ids):
                if i in self._where:
                    other = files[self._where[i][0]].name
                    raise ShardError(f"{p}: id {i!r} also in {other}; stale shards? rerun the stage that writes {d}")
                self._where[i] = (s, row)
            self._ids.extend(ids)
        self._handles: OrderedDict[int, tuple[h5py.File, dict[str, h5py.Dataset]]] = OrderedDict()
        self._pid = os.getpid()

    # -- basic container protocol
    @property
    def ids(self) -> list[str]:
        return self._ids

    @property
    def provenance(self) -> dict:
        return dict(self._provenance or {})

    @property
    def fingerprint(self) -> str:
        """The run fingerprint all shards share."""
        return self._run_fp or ""

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._where

    def locate(self, item_id: str) -> tuple[Path, int]:
        """(shard file, row) of an id."""
        s, row = self._lookup(item_id)
        return self.files[s], row

    def _lookup(self, item_id: str) -> tuple[int, int]:
        try:
            return self._where[item_id]
        except KeyError:
            raise KeyError(f"id {item_id!r} not in {self.dir} ({len(self)} items)") from None

    # -- handles
    def _handle(self, s: int) -> tuple[h5py.File, dict[str, h5py.Dataset]]:
        """Shard ``s``'s open file and its datasets (opened once per process)."""
        if self._pid != os.getpid():  # forked: drop the parent's handles, open our own
            for old, _ in self._handles.values():
                try:
                    old.close()  # closes this process's copy only
                except Exception:
                    pass
            self._handles = OrderedDict()
            self._pid = os.getpid()
        entry = self._handles.get(s)
        if entry is None:
            f = h5py.File(self.files[s], "r")
            entry = self._handles[s] = (f, {n: f[n] for n in self.datasets})
            while len(self._handles) > self.max_open:
                _, (old, _) = self._handles.popitem(last=False)
                old.close()
        else:
            self._handles.move_to_end(s)
        return entry

    def get(self, item_id: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One item's arrays (each of shape ``dataset.shape[1:]``), read lazily."""
        s, row = self._lookup(item_id)
        datasets = self._handle(s)[1]
        names = self.datasets if names is None else names
        return {n: np.asarray(datasets[n][row]) for n in names}

    def __getitem__(self, key: int | str) -> dict[str, np.ndarray]:
        """By id (str) or by position in ``ids`` (int); a map-style Dataset as is."""
        return self.get(self._ids[key] if isinstance(key, (int, np.integer)) else key)

    def read_all(self, name: str) -> np.ndarray:
        """The whole dataset ``name`` in ``ids`` order, shape (len, ...)."""
        if name not in self.datasets:
            raise KeyError(f"{self.dir}: no dataset {name!r} (have: {', '.join(self.datasets)})")
        return np.concatenate([self._handle(s)[1][name][()] for s in range(len(self.files))], axis=0)

    def close(self) -> None:
        if self._pid == os.getpid():
            for f, _ in self._handles.values():
                f.close()
        self._handles = OrderedDict()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"ShardReader({str(self.dir)!r}, {len(self)} items, {len(self.files)} shards)"
