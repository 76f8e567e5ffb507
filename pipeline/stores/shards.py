"""HDF5 feature shards: planning, atomic deterministic writes, resume, and a lazy reader.

A shard dir holds ``shard-00000.h5``, ``shard-00001.h5``, ... Each shard has a dataset
``ids`` (N,) of UTF-8 strings and one dataset per feature array with N rows, chunked so
that one item is one chunk read. Attributes: ``provenance`` (canonical JSON),
``fingerprint`` (this shard's: the run fingerprint + its ids), ``run_fingerprint``
(the caller's hash of model + weights + preprocessing + params + inputs), ``count`` and
``complete`` (written last). No timestamps: the same inputs give the same bytes.

Contents are verified, not assumed: every dataset carries a ``sha256`` attribute (over its
dtype, shape and bytes; for ``ids``, over the id list), and every numeric dataset is stored
with HDF5 per-chunk Fletcher-32 checksums, so any read of a damaged chunk fails (reported
as :class:`CorruptShardError`, naming the file and the dataset).

Storage precision: a float dataset can be stored as ``float32``, ``float16`` (HDF5's IEEE
half) or ``bfloat16``. HDF5 has no bfloat16 type, so bfloat16 is stored as ``uint16`` bit
patterns (the upper half of each float32, rounded to nearest even, as torch rounds) with the
dataset attribute ``encoding = "bfloat16"``; its digest hashes the label ``bfloat16`` instead
of ``<u2``, so the attribute is covered too. :class:`ShardReader` decodes both to float32
unless asked for the stored arrays (``raw=True``).

A shard counts as done only if it opens, is complete, holds ``count`` ids, its
fingerprint matches and every digest verifies; anything else (missing, truncated,
foreign, stale, damaged, written before digests) is recomputed, and a shard that fails
verification is named on stderr and in the run's stats.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import artifacts
from pipeline.artifacts import atomic_path, canonical_json, fingerprint as hash_parts

SHARD_GLOB = "shard-*.h5"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.h5$")
_LIBVER = ("v110", "v110")  # fixed-array chunk index (O(1) chunk lookup); readable by HDF5 >= 1.10
_STR = h5py.string_dtype("utf-8")
DIGEST_ATTR = "sha256"  # per dataset: sha256 of its dtype, shape and bytes (ids: of the id list)
ENCODING_ATTR = "encoding"  # per dataset, only where the stored bits are not the numpy dtype: "bfloat16"
BFLOAT16 = "bfloat16"
STORAGE_DTYPES = ("float32", "float16", BFLOAT16)  # shards.dtype: how float features are stored
_ENCODINGS = (BFLOAT16,)
BLOCK_BYTES = 64 << 20  # rows read at a time when a whole dataset is scanned


class ShardError(RuntimeError):
    """A shard dir is missing, empty or inconsistent."""


class CorruptShardError(ShardError):
    """A shard's stored bytes fail their checksum or digest; ``dataset`` and ``detail`` say where and how."""

    def __init__(self, message: str, dataset: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.dataset, self.detail = dataset, detail


def _corrupt(path: str | os.PathLike, dataset: str, detail: str) -> CorruptShardError:
    return CorruptShardError(f"{path}: dataset {dataset!r}: {detail}: the file is damaged; rerun the stage that "
                             f"writes it (it rewrites every shard that fails verification)", dataset, detail)


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
    return artifacts.temp_leftovers(out_dir, SHARD_GLOB)


def shard_fingerprint(run_fingerprint: str, ids: Sequence[str], item_keys: Sequence[str] | None = None) -> str:
    """A shard's own fingerprint: the run fingerprint plus its ids (and optional per-item keys)."""
    parts: list[Any] = ["shard", run_fingerprint, list(ids)]
    if item_keys is not None:
        parts.append(list(item_keys))
    return hash_parts(*parts)


# ---- storage precision ------------------------------------------------------------------------

class StorageOverflowError(ValueError):
    """Finite values that the chosen storage dtype cannot hold (float16 beyond +-65504)."""


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN -> 0x7FC0 (torch's rule).

    The same bits as ``torch.tensor(a).to(torch.bfloat16).view(torch.int16)`` for every
    non-NaN input; values past bfloat16's largest finite value round to +-inf, as in torch.
    """
    f = np.ascontiguousarray(a, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)  # no wrap-around in the sum below
    out = ((u + (np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1)))) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact: every bfloat16 is a float32)."""
    b = np.ascontiguousarray(bits)
    if b.dtype != np.uint16:
        raise ValueError(f"bfloat16 bits must be uint16, got {b.dtype}")
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def check_storage_dtype(dtype: str, what: str = "shards.dtype") -> str:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    return dtype


def encode_storage(a: np.ndarray, dtype: str, name: str = "array") -> tuple[np.ndarray, str | None]:
    """``(stored array, encoding attribute or None)`` of a float array stored as ``dtype``.

    float32 and float16 are stored as themselves (round to nearest even); bfloat16 as uint16
    bits with encoding ``bfloat16``. A finite value that float16 cannot hold (beyond +-65504)
    raises :class:`StorageOverflowError` rather than becoming inf.
    """
    check_storage_dtype(dtype)
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise ValueError(f"array {name!r} has dtype {a.dtype}; a storage dtype applies to float arrays only")
    if dtype == BFLOAT16:
        return to_bfloat16_bits(a), BFLOAT16
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
        out = np.ascontiguousarray(a, dtype=np.dtype(dtype))
    if dtype == "float16" and a.dtype.itemsize > 2:
        with np.errstate(over="ignore", invalid="ignore"):
            lost = np.isinf(out) & np.isfinite(a)
        if lost.any():
            worst = float(np.abs(a[lost]).max())
            raise StorageOverflowError(
                f"array {name!r}: {int(lost.sum())} finite value(s) beyond float16's range (+-65504; largest "
                f"{worst:.6g}) would become inf; store it as bfloat16 or float32 (shards.dtype)")
    return out, None


def decode_storage(a: np.ndarray, encoding: str | None) -> np.ndarray:
    """A stored array as float32 values: bfloat16 bits decoded, float16 widened; anything else as is."""
    if encoding == BFLOAT16:
        return from_bfloat16_bits(a)
    if encoding:
        raise ValueError(f"unknown storage encoding {encoding!r} (known: {', '.join(_ENCODINGS)})")
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def dataset_encoding(ds: h5py.Dataset) -> str | None:
    """A dataset's ``encoding`` attribute (``"bfloat16"``) or None; an unknown one raises :class:`CorruptShardError`."""
    enc = ds.attrs.get(ENCODING_ATTR)
    if enc is None:
        return None
    enc = _attr_str(enc)
    if enc not in _ENCODINGS or ds.dtype != np.uint16:
        name = ds.name.lstrip("/")
        detail = (f"unknown storage encoding {enc!r} on dtype {ds.dtype} (known: bfloat16 stored as uint16); "
                  f"written by a newer version?")
        raise CorruptShardError(f"{ds.file.filename}: dataset {name!r}: {detail}", name, detail)
    return enc


def storage_dtype(ds: h5py.Dataset) -> str:
    """How a dataset is stored, by name: ``bfloat16``, ``float16``, ``float32``, ``int64``, ``bool``, ``utf-8 str``."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return "utf-8 str"
    return dataset_encoding(ds) or str(ds.dtype)


# ---- content digests and checked reads ------------------------------------------------------

def _attr_str(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def array_digest(a: np.ndarray, encoding: str | None = None) -> str:
    """sha256 of an array's dtype, shape and C-order bytes: what ``write_shard`` stores per dataset.

    ``a`` is the stored array; with ``encoding`` (``"bfloat16"``) that name replaces the dtype.
    """
    a = np.ascontiguousarray(a)
    h = _hasher(a.dtype, a.shape, encoding)
    h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _hasher(dtype: np.dtype, shape: tuple[int, ...], encoding: str | None = None) -> Any:
    label = encoding or np.dtype(dtype).str
    return hashlib.sha256(f"{label}{tuple(int(n) for n in shape)}".encode())


def _ids_digest(ids: Sequence[str]) -> str:
    return hash_parts("ids", list(ids))


def read_checked(path: str | os.PathLike, ds: h5py.Dataset, sel: Any = (), what: str = "") -> np.ndarray:
    """``ds[sel]``; a chunk failing its Fletcher-32 checksum raises :class:`CorruptShardError` naming file and dataset."""
    try:
        return ds[sel]
    except OSError as e:
        why = ("a chunk fails its Fletcher-32 checksum (damaged bytes)" if "filter returned failure" in str(e)
               else str(e))
        raise _corrupt(path, ds.name.lstrip("/"), f"cannot read{' ' + what if what else ''} ({why})") from e


def read_ids(path: str | os.PathLike, ds: h5py.Dataset) -> list[str]:
    """A shard's ``ids`` dataset, decoded."""
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in read_checked(path, ds)]


def row_blocks(path: str | os.PathLike, ds: h5py.Dataset) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` of a dataset in blocks of about ``BLOCK_BYTES``, read with :func:`read_checked`."""
    if ds.ndim == 0:
        yield 0, read_checked(path, ds)
        return
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, ds.shape[0], step):
        yield start, read_checked(path, ds, slice(start, start + step), f"rows {start}..{start + step - 1}")


def dataset_digest(path: str | os.PathLike, ds: h5py.Dataset,
                   visit: Callable[[str, int, np.ndarray], None] | None = None) -> str:
    """The digest of a stored dataset, read block by block (``visit(name, start, block)`` sees each
    numeric block's values: bfloat16 bits decoded to float32)."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return _ids_digest(read_ids(path, ds))
    encoding = dataset_encoding(ds)
    h = _hasher(ds.dtype, ds.shape, encoding)
    name = ds.name.lstrip("/")
    for start, block in row_blocks(path, ds):
        if visit is not None:
            visit(name, start, decode_storage(block, encoding) if encoding else block)
        h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
    return h.hexdigest()


def verify_shard(path: str | os.PathLike, visit: Callable[[str, int, np.ndarray], None] | None = None) -> list[str]:
    """What fails verification in one shard, one line per dataset ([]: every dataset matches its digest).

    Reads every dataset once (Fletcher-32 checks each chunk on the way); ``visit`` as in
    :func:`dataset_digest`, so a caller can scan the values in the same pass. Raises only
    if the file cannot be opened.
    """
    p = Path(path)
    problems = []
    with h5py.File(p, "r") as f:
        for name in f.keys():
            ds = f[name]
            if not isinstance(ds, h5py.Dataset):
                problems.append(f"{name!r}: not a dataset")
                continue
            want = ds.attrs.get(DIGEST_ATTR)
            try:
                got = dataset_digest(p, ds, visit)
            except CorruptShardError as e:
                problems.append(f"dataset {e.dataset!r}: {e.detail}")
                continue
            if want is None:
                problems.append(f"dataset {name!r}: no content digest (written before shards stored digests)")
            elif _attr_str(want) != got:
                problems.append(f"dataset {name!r}: content does not match its sha256 digest")
    return problems


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
    dtypes: Mapping[str, str] | None = None,
) -> None:
    """Write one shard atomically and deterministically (same inputs -> same bytes).

    ``arrays``: name -> (N, ...) array; each item is one chunk. ``compression``: None
    (default), ``"lzf"`` or ``"gzip"`` (``compression_opts`` = level). ``run_fingerprint``
    (default: hash of ``provenance``) is what every shard of one cache must share.
    ``dtypes``: name -> storage dtype (``float32`` | ``float16`` | ``bfloat16``, see
    :func:`encode_storage`) for float arrays; the others are stored as given.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{path}: duplicate ids in one shard: {dup}")
    if compression not in (None, "lzf", "gzip"):
        raise ValueError(f"{path}: compression must be none, 'lzf' or 'gzip', got {compression!r}")
    arrays = _check_arrays(ids, arrays, str(path))
    encodings: dict[str, str | None] = {}
    for name, dt in (dtypes or {}).items():
        if name not in arrays:
            raise ValueError(f"{path}: dtypes names {name!r}, which is not among the arrays ({', '.join(sorted(arrays))})")
        try:
            arrays[name], encodings[name] = encode_storage(arrays[name], dt, name)
        except ValueError as e:
            raise type(e)(f"{path}: {e}") from None
    prov_json = canonical_json(dict(provenance))
    run_fp = run_fingerprint or hash_parts("provenance", json.loads(prov_json))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=_LIBVER, track_order=False) as f:
            ds = f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR, track_times=False)
            ds.attrs[DIGEST_ATTR] = _ids_digest(ids)
            for name in sorted(arrays):
                a = arrays[name]
                kw: dict[str, Any] = {"track_times": False}
                if a.size:  # Fletcher-32 needs chunks: one item per chunk (a 1-D array: one chunk)
                    kw["chunks"] = (1, *a.shape[1:]) if a.ndim >= 2 else (a.shape[0],)
                    kw["fletcher32"] = True
                    if compression:
                        kw["compression"] = compression
                        if compression_opts is not None:
                            kw["compression_opts"] = compression_opts
                ds = f.create_dataset(name, data=a, **kw)
                ds.attrs[DIGEST_ATTR] = array_digest(a, encodings.get(name))
                if encodings.get(name):
                    ds.attrs[ENCODING_ATTR] = encodings[name]
            f.attrs["provenance"] = prov_json
            f.attrs["fingerprint"] = str(fingerprint)
            f.attrs["run_fingerprint"] = run_fp
            f.attrs["count"] = np.int64(len(ids))
            f.attrs["complete"] = True  # last: a file without it was not closed cleanly


def shard_status(path: str | os.PathLike, fingerprint: str) -> tuple[str, str]:
    """``(state, why)`` of one shard: ``done``, ``missing``, ``stale`` (other fingerprint) or
    ``failed`` (damaged, incomplete, unreadable or written before digests). Never raises.

    ``done`` needs a complete shard with this fingerprint, ``count`` rows everywhere and
    every dataset matching its stored digest (the whole shard is read once).
    """
    p = Path(path)
    if not p.is_file():
        return "missing", ""
    try:
        with h5py.File(p, "r") as f:
            a = f.attrs
            if not bool(a.get("complete", False)):
                return "failed", "not marked complete"
            if _attr_str(a.get("fingerprint", "")) != fingerprint:
                return "stale", ""
            count = int(a.get("count", -1))
            if "ids" not in f:
                return "failed", "no 'ids' dataset"
            for k in f.keys():
                if not isinstance(f[k], h5py.Dataset) or f[k].shape[:1] != (count,):
                    return "failed", f"{k!r} does not hold the shard's {count} rows"
            if any(DIGEST_ATTR not in f[k].attrs for k in f.keys()):
                return "failed", "no content digest (written before shards stored digests)"
        problems = verify_shard(p)
    except Exception as e:  # truncated, not HDF5, unreadable
        return "failed", f"cannot read ({type(e).__name__}: {e})"
    return ("failed", "; ".join(problems)) if problems else ("done", "")


def shard_is_done(path: str | os.PathLike, fingerprint: str) -> bool:
    """True only if ``path`` is a complete shard with this fingerprint whose digests verify. Never raises."""
    return shard_status(path, fingerprint)[0] == "done"


# ---- the resumable driver -----------------------------------------------------------------

@dataclass
class ShardWork:
    """One worker's shards: the plan, which to (re)write, and which of those failed verification."""

    plan: list[list[str]]
    selected: list[int]
    todo: list[tuple[int, str]] = field(default_factory=list)  # (shard number, shard fingerprint)
    failed: dict[str, str] = field(default_factory=dict)       # shard file name -> why it is rewritten
    seconds: float = 0.0                                        # spent checking (reading + digests)

    @property
    def pending(self) -> list[list[str]]:
        """The id lists of the shards to write, in order."""
        return [self.plan[k] for k, _ in self.todo]


def plan_work(
    ids: Sequence[str],
    size: int,
    out_dir: str | os.PathLike,
    fingerprint: str,
    shard_index: int = 0,
    shard_count: int = 1,
    item_keys: Mapping[str, str] | None = None,
) -> ShardWork:
    """Check each shard this worker owns once (:func:`shard_status`): done ones are skipped, the rest go
    to ``todo``; one that fails verification is also named on stderr and in ``failed``."""
    t0 = time.perf_counter()
    plan = plan_shards(ids, size)
    work = ShardWork(plan, select_shards(len(plan), shard_index, shard_count))
    for k in work.selected:
        keys = [item_keys[i] for i in plan[k]] if item_keys is not None else None
        sfp = shard_fingerprint(fingerprint, plan[k], keys)
        path = shard_path(out_dir, k)
        state, why = shard_status(path, sfp)
        if state == "done":
            continue
        work.todo.append((k, sfp))
        if state == "failed":
            work.failed[path.name] = why
            print(f"shards: {path} fails verification ({why}); rewriting it", file=sys.stderr)
    work.seconds = time.perf_counter() - t0
    return work


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
    work: ShardWork | None = None,
    dtypes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Compute and write every shard this worker owns that is not already done.

    ``fingerprint``: the caller's run fingerprint (model, weights sha, preprocessing,
    params); each shard adds its ids (and ``item_keys[id]``, e.g. a file hash, if given),
    so changing one id rewrites only its shard. ``compute(ids) -> {name: (len(ids), ...)}``.
    ``work``: the :func:`plan_work` of these same arguments, if the caller already made it
    (each shard is then verified once). ``dtypes``: storage dtype per array (:func:`write_shard`);
    it must be part of ``fingerprint``, since it changes what a shard holds. Shard files
    beyond the plan are deleted (every worker; nobody writes there); temp leftovers only when ``shard_count == 1`` (other
    workers may be writing theirs). Returns stats: shards_total, shards_selected,
    shards_written, shards_skipped, shards_failed_verification (file -> why; rewritten),
    verify_seconds (checking the existing shards), shards_deleted, items, seconds, items_per_s.
    """
    from pipeline.progress import progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if work is None:
        work = plan_work(ids, size, out, fingerprint, shard_index, shard_count, item_keys)
    plan = work.plan

    deleted = 0
    for p in shard_files(out):
        if shard_index_of(p) >= len(plan):
            p.unlink(missing_ok=True)
            deleted += 1
    if shard_count == 1:
        for p in temp_leftovers(out):
            p.unlink(missing_ok=True)

    t0 = time.perf_counter()
    items = 0
    with progress(total=sum(len(plan[k]) for k, _ in work.todo), desc=progress_desc, unit="item",
              dynamic_ncols=True, mininterval=1.0) as bar:
        for k, sfp in work.todo:
            arrays = compute(list(plan[k]))
            write_shard(shard_path(out, k), plan[k], arrays, provenance, sfp, run_fingerprint=fingerprint,
                        compression=compression, compression_opts=compression_opts, dtypes=dtypes)
            items += len(plan[k])
            bar.update(len(plan[k]))
    seconds = time.perf_counter() - t0
    return {
        "shards_total": len(plan),
        "shards_selected": len(work.selected),
        "shards_written": len(work.todo),
        "shards_skipped": len(work.selected) - len(work.todo),
        "shards_failed_verification": dict(sorted(work.failed.items())),
        "verify_seconds": round(work.seconds, 3),
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

    Reduced-precision datasets (float16, bfloat16: ``stored_dtypes``) are returned as
    float32 by default; ``raw=True`` returns them as stored (float16, or bfloat16 bits as
    uint16). ``datasets`` gives each dataset's (item shape, returned dtype).
    """

    def __init__(self, dir: str | os.PathLike, stage: str | None = None, max_open: int = 64,
                 raw: bool = False) -> None:
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
        self.raw = bool(raw)
        self._ids: list[str] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._provenance: dict | None = None
        self._run_fp: str | None = None
        self.datasets: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.stored_dtypes: dict[str, str] = {}  # name -> bfloat16 | float16 | float32 | int64 | bool ...
        self._encodings: dict[str, str | None] = {}
        stored: dict[str, tuple[tuple[int, ...], str]] = {}
        for s, p in enumerate(files):
            try:
                with h5py.File(p, "r") as f:
                    if not bool(f.attrs.get("complete", False)):
                        raise ShardError(f"{p}: shard is incomplete (not marked complete); rerun its stage")
                    ids = read_ids(p, f["ids"])
                    undigested = [k for k in f.keys() if DIGEST_ATTR not in f[k].attrs]
                    if undigested:
                        raise ShardError(f"{p}: no content digest on {', '.join(undigested)} (written before shards "
                                         f"stored digests); rerun the stage that writes it to rebuild it")
                    if _attr_str(f["ids"].attrs[DIGEST_ATTR]) != _ids_digest(ids):
                        raise _corrupt(p, "ids", "content does not match its sha256 digest")
                    run_fp = _attr_str(f.attrs.get("run_fingerprint", ""))
                    layout = {k: (f[k].shape[1:], storage_dtype(f[k])) for k in f.keys() if k != "ids"}
                    if s == 0:
                        self._provenance = json.loads(_attr_str(f.attrs.get("provenance", "{}")))
                        self._run_fp = run_fp
                        stored = layout
                        self._encodings = {k: dataset_encoding(f[k]) for k in layout}
                        self.stored_dtypes = {k: dt for k, (_, dt) in layout.items()}
                        self.datasets = {k: (shape, self._returned_dtype(f[k].dtype, self._encodings[k]))
                                         for k, (shape, _) in layout.items()}
                    else:
                        if run_fp != self._run_fp:
                            raise ShardError(
                                f"{p}: written with fingerprint {run_fp[:12]}, but {files[0].name} with "
                                f"{(self._run_fp or '')[:12]}: the shards come from different runs "
                                f"(model, weights, params or inputs differ); rerun the stage that writes {d}")
                        if layout != stored:
                            raise ShardError(f"{p}: datasets {layout} differ from {files[0].name}: {stored}")
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

    def _returned_dtype(self, dtype: np.dtype, encoding: str | None) -> np.dtype:
        if self.raw:
            return np.dtype(dtype)
        return np.dtype(np.float32) if encoding or dtype == np.float16 else np.dtype(dtype)

    def _decode(self, name: str, a: np.ndarray) -> np.ndarray:
        return a if self.raw else decode_storage(a, self._encodings.get(name))

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
        what = f"row {row} (id {item_id!r})"
        return {n: self._decode(n, np.asarray(read_checked(self.files[s], datasets[n], row, what))) for n in names}

    def __getitem__(self, key: int | str) -> dict[str, np.ndarray]:
        """By id (str) or by position in ``ids`` (int); a map-style Dataset as is."""
        return self.get(self._ids[key] if isinstance(key, (int, np.integer)) else key)

    def read_all(self, name: str) -> np.ndarray:
        """The whole dataset ``name`` in ``ids`` order, shape (len, ...); each shard's part is checked against its
        digest (float16/bfloat16 decoded to float32 unless ``raw``)."""
        if name not in self.datasets:
            raise KeyError(f"{self.dir}: no dataset {name!r} (have: {', '.join(self.datasets)})")
        parts = []
        for s, path in enumerate(self.files):
            ds = self._handle(s)[1][name]
            a = read_checked(path, ds)
            if array_digest(a, self._encodings.get(name)) != _attr_str(ds.attrs[DIGEST_ATTR]):
                raise _corrupt(path, name, "content does not match its sha256 digest")
            parts.append(self._decode(name, a))
        return np.concatenate(parts, axis=0)

    def iter_blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row in ids order, rows)`` of dataset ``name`` in blocks of about ``BLOCK_BYTES``
        (decoded like :meth:`read_all`), so a dataset larger than memory can be streamed. Each
        shard's digest is checked after its last block: a mismatch raises
        :class:`CorruptShardError` then, so a consumer must not keep what it got on an error."""
        if name not in self.datasets:
            raise KeyError(f"{self.dir}: no dataset {name!r} (have: {', '.join(self.datasets)})")
        base = 0
        for s, path in enumerate(self.files):
            ds = self._handle(s)[1][name]
            enc = self._encodings.get(name)
            h = _hasher(ds.dtype, ds.shape, enc)
            for start, block in row_blocks(path, ds):
                h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
                yield base + start, self._decode(name, block)
            if h.hexdigest() != _attr_str(ds.attrs[DIGEST_ATTR]):
                raise _corrupt(path, name, "content does not match its sha256 digest")
            base += int(ds.shape[0])

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
