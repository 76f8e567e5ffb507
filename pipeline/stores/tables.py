"""Parquet feature tables with provenance: text features, caption features, manifests.

A row may hold ndarrays of any shape. Each array column ``name`` is stored as
``large_list<float32>`` (the flattened values) plus ``name_shape``
(``fixed_size_list<int32>[ndim]``), so the file stays typed and readable by any Parquet
tool. Floating arrays come back as float32. Provenance lives in the schema metadata
(``b"provenance"``, as ``pipeline.artifacts.write_parquet`` writes it).

Memory does not grow with the table. :class:`FeatureTableWriter` takes rows in batches and
writes a row group whenever about ``ROW_GROUP_BYTES`` of array values are pending (a temp
name, renamed at the end: an interrupted write leaves no file under the final name).
:class:`FeatureTable` reads at open only the small scalar columns (ids, counts) and builds an
id -> row index from the id column (64-bit hashes, sorted: 12 bytes an id); an array row is
read by decoding its row group (just that column), kept in an LRU of ``CACHE_BYTES``.

Contents are verified, not assumed: the writer stores a sha256 of every column of every row
group in the footer's key-value metadata (``row_group_sha256``). The reader checks the
scalar columns at open and each (row group, array column) the first time it decodes it;
a mismatch raises :class:`TableError` naming the file, the column and the row group.
:meth:`FeatureTable.verify_all` checks everything (``inspect --check``). Files of the older
format (one sha256 per whole column, ``content_sha256``) are refused by the caches.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import atomic_path, canonical_json, read_parquet_provenance

SHAPE_SUFFIX = "_shape"
DIGEST_KEY = b"row_group_sha256"  # footer key-value metadata: JSON {"columns": [...], "row_groups": [[sha, ...], ...]}
OLD_DIGEST_KEY = b"content_sha256"  # the older format: one sha256 per whole column, in the schema metadata
TABLE_FORMAT = 2  # 2: row groups written as rows arrive, one digest per (row group, column)
ROW_GROUP_BYTES = 1 << 20  # array-value bytes per row group (a lazy read decodes one row group of one column)
CACHE_BYTES = 16 << 20  # decoded row groups a reader keeps per file (LRU)


class TableError(RuntimeError):
    """A feature table or manifest is missing or inconsistent."""


def _stage_hint(path: Path, stage: str | None) -> str:
    return f"; it is written by the `{stage.split('@')[0]}` stage (run `dvc repro {stage}`)" if stage else ""


def _require(path: Path, stage: str | None) -> None:
    if not path.is_file():
        raise TableError(f"{path}: not found{_stage_hint(path, stage)}")


NO_DIGEST = ("no per-row-group content digest (written before feature tables were written in row groups "
             "with a digest each)")


def _require_digests(t: FeatureTable, stage: str | None) -> FeatureTable:
    """A feature cache must carry digests: one written without them (or in the older format) is refused."""
    if not t.digested:
        raise TableError(f"{t.path}: {NO_DIGEST}; rebuild it{_stage_hint(t.path, stage)}")
    return t


# ---- content digests ------------------------------------------------------------------------

def _hash_values(h: Any, a: pa.Array) -> None:
    """Feed one column's values to ``h``, independent of chunking and slicing."""
    t = a.type
    if a.null_count:
        h.update(b"json" + canonical_json(a.to_pylist()).encode("utf-8"))
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = np.asarray(a.offsets.to_numpy(), dtype=np.int64)
        h.update(b"list" + np.diff(offsets).tobytes())
        _hash_values(h, a.flatten())
    elif pa.types.is_fixed_size_list(t):
        h.update(f"fixed{t.list_size}".encode())
        _hash_values(h, a.flatten())
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        h.update(str(t).encode())
        h.update(np.ascontiguousarray(a.to_numpy(zero_copy_only=False)).view(np.uint8))
    else:
        h.update(str(t).encode() + canonical_json(a.to_pylist()).encode("utf-8"))


def column_digest(col: pa.Array | pa.ChunkedArray) -> str:
    """sha256 of one column's values (independent of how it is chunked)."""
    h = hashlib.sha256()
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    _hash_values(h, col)
    return h.hexdigest()


def table_digests(table: pa.Table) -> dict[str, str]:
    """``{column: sha256 of its values}``: what the writer stores for each row group."""
    return {name: column_digest(table.column(name)) for name in table.column_names}


def stored_digests(path: str | os.PathLike) -> dict | None:
    """``{"columns": [...], "row_groups": [[sha, ...], ...]}`` from a table's footer, None if absent."""
    raw = (pq.read_metadata(path).metadata or {}).get(DIGEST_KEY)
    return json.loads(raw) if raw else None


# ---- generic array columns ------------------------------------------------------------------

FLOAT_DTYPES = ("float32", "float16")  # storage precision of float arrays (Parquet has no bfloat16)


def _as_value_dtype(a: np.ndarray, float_dtype: str = "float32") -> np.ndarray:
    if a.dtype.kind == "f":
        return a.astype(float_dtype, copy=False)
    if a.dtype.kind in "biu":
        return a
    raise ValueError(f"dtype {a.dtype} cannot be stored in an array column")


def array_columns(name: str, arrays: Sequence[np.ndarray] | np.ndarray, ndim: int | None = None,
                  float_dtype: str = "float32") -> dict[str, pa.Array]:
    """``{name: large_list<values>, name_shape: fixed_size_list<int32>[ndim]}`` for per-row arrays.

    ``arrays``: a sequence of arrays of one ndim (shapes may differ), or one stacked
    (N, ...) ndarray (every row then has shape ``arrays.shape[1:]``). ``ndim``: the row ndim
    when ``arrays`` is an empty sequence (default 1). ``float_dtype``: how float rows are stored
    (float32 or float16; readers get float32 back).
    """
    if isinstance(arrays, np.ndarray):
        if arrays.ndim < 2:
            raise ValueError(f"column {name!r}: a stacked array needs shape (N, ...), got {arrays.shape}")
        n, row_shape = arrays.shape[0], arrays.shape[1:]
        values = _as_value_dtype(np.ascontiguousarray(arrays), float_dtype).reshape(-1)
        sizes = np.full(n, int(np.prod(row_shape)), dtype=np.int64)
        shapes = np.tile(np.asarray(row_shape, dtype=np.int32), (n, 1))
        ndim = len(row_shape)
    else:
        rows = [np.asarray(a) for a in arrays]
        ndims = {a.ndim for a in rows}
        if len(ndims) > 1:
            raise ValueError(f"column {name!r}: rows have different ndim {sorted(ndims)}")
        ndim = ndims.pop() if ndims else (ndim or 1)
        if ndim == 0:
            raise ValueError(f"column {name!r}: rows must be arrays (ndim >= 1), not scalars")
        kinds = {_as_value_dtype(a, float_dtype).dtype for a in rows}
        if len(kinds) > 1:
            raise ValueError(f"column {name!r}: rows have different dtypes {sorted(map(str, kinds))}")
        dtype = kinds.pop() if kinds else np.dtype(float_dtype)
        values = np.concatenate([_as_value_dtype(a, float_dtype).reshape(-1) for a in rows]) if rows else np.zeros(0, dtype)
        sizes = np.array([a.size for a in rows], dtype=np.int64)
        shapes = np.array([a.shape for a in rows], dtype=np.int32).reshape(len(rows), ndim)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    shape_col = pa.FixedSizeListArray.from_arrays(pa.array(shapes.reshape(-1), pa.int32()), ndim)
    return {name: lists, name + SHAPE_SUFFIX: shape_col}


def _array_value_columns(schema: pa.Schema) -> set[str]:
    return {n for n in schema.names if n + SHAPE_SUFFIX in schema.names}


def _row_bytes(table: pa.Table) -> np.ndarray:
    """(N,) bytes of array values per row (+ 8 for the row itself): what row groups are cut by."""
    out = np.full(table.num_rows, 8, dtype=np.int64)
    for name in table.column_names:
        col = table.column(name)
        if not pa.types.is_large_list(col.type):
            continue
        width = col.type.value_type.bit_width // 8
        sizes = [np.diff(np.asarray(c.offsets.to_numpy(), dtype=np.int64)) for c in col.chunks]
        out += width * (np.concatenate(sizes) if sizes else np.zeros(0, np.int64))
    return out


class _Writer:
    """A writer used as a context manager: ``close()`` on success, ``abort()`` on an error
    (the temp file goes, any earlier complete file stays)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FeatureTableWriter(_Writer):
    """Write a feature table batch by batch: a row group per ~``row_group_bytes``, digests per row group.

    ``write(columns, arrays)`` takes one batch (scalar columns + per-row arrays, as
    :func:`write_feature_table`); the first batch fixes the schema. ``key``: an id column whose
    values must be unique across all batches (checked per batch by 64-bit hashes, 8 bytes an id).
    ``float_dtype``: storage precision of float arrays (``FLOAT_DTYPES``).
    Use as a context manager: the file appears under its final name only when the block ends
    without an error; otherwise the temp file is removed.
    """

    def __init__(self, path: str | os.PathLike, provenance: Mapping[str, Any], key: str | None = None,
                 row_group_bytes: int = ROW_GROUP_BYTES, float_dtype: str = "float32") -> None:
        if float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"{path}: float dtype {float_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        self.float_dtype = float_dtype
        self.path = Path(path)
        self.key = key
        self.row_group_bytes = max(1, int(row_group_bytes))
        self._provenance = canonical_json(dict(provenance)).encode("utf-8")
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[tuple[pa.Table, np.ndarray]] = []
        self._pending_bytes = 0
        self._digests: list[list[str]] = []
        self._hashes = np.zeros(0, np.int64)  # sorted hashes of the ids written so far
        self.num_rows = 0
        self._done = False

    def write(self, columns: Mapping[str, Sequence[Any] | np.ndarray | pa.Array],
              arrays: Mapping[str, Sequence[np.ndarray] | np.ndarray],
              ndims: Mapping[str, int] | None = None) -> None:
        """Append one batch of rows (``ndims``: row ndim of an array column given as an empty list)."""
        data: dict[str, pa.Array] = {}
        for k, v in columns.items():
            if isinstance(v, (pa.Array, pa.ChunkedArray)):
                data[k] = v
            else:
                data[k] = pa.array(v.tolist() if isinstance(v, np.ndarray) else list(v))
        for k, v in arrays.items():
            if k in data or k + SHAPE_SUFFIX in data:
                raise ValueError(f"{self.path}: column {k!r} given twice")
            data.update(array_columns(k, v, (ndims or {}).get(k), self.float_dtype))
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{self.path}: columns have different lengths {lengths}")
        table = pa.table(data)
        if self._schema is None:
            self._schema = table.schema.with_metadata({b"provenance": self._provenance})
            # no dictionary for array values: floats do not repeat, and a dictionary page tried
            # and dropped per row group made files 1.5x larger and reads 3x slower (measured)
            plain = [n for n in table.column_names if n not in _array_value_columns(table.schema)]
            self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="snappy", use_dictionary=plain)
        elif table.num_rows == 0:
            return
        elif table.schema.remove_metadata() != self._schema.remove_metadata():
            try:
                table = table.cast(self._schema.remove_metadata())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise ValueError(f"{self.path}: a batch's columns {table.schema.names} / types differ from the "
                                 f"first batch's ({e})") from None
        if self.key is not None:
            self._check_ids(table.column(self.key).to_pylist())
        sizes = _row_bytes(table)
        self._pending.append((table, sizes))
        self._pending_bytes += int(sizes.sum())
        self.num_rows += table.num_rows
        if self._pending_bytes >= self.row_group_bytes:
            self._flush(final=False)

    def _check_ids(self, ids: list) -> None:
        h = np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(h, kind="stable")
        hs = h[order]
        dup = np.flatnonzero(hs[1:] == hs[:-1])
        if dup.size:
            raise ValueError(f"{self.path}: duplicate {self.key} {ids[int(order[dup[0] + 1])]!r} (appears more than once)")
        if self._hashes.size:
            pos = np.searchsorted(self._hashes, hs)
            hit = np.flatnonzero(self._hashes[np.minimum(pos, self._hashes.size - 1)] == hs)
            if hit.size:
                raise ValueError(f"{self.path}: duplicate {self.key} {ids[int(order[hit[0]])]!r} (also in an "
                                 f"earlier batch)")
        self._hashes = np.concatenate([self._hashes, hs])
        self._hashes.sort(kind="stable")

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables([t for t, _ in self._pending])
        sizes = np.concatenate([s for _, s in self._pending])
        cum = np.cumsum(sizes)
        start, base = 0, 0
        while start < table.num_rows:
            end = int(np.searchsorted(cum, base + self.row_group_bytes, side="left")) + 1
            if end > table.num_rows:
                if not final:
                    break
                end = table.num_rows
            self._write_group(table.slice(start, end - start))
            base, start = int(cum[end - 1]), end
        rest = table.slice(start)
        self._pending = [(rest, sizes[start:])] if rest.num_rows else []
        self._pending_bytes = int(self._pending[0][1].sum()) if self._pending else 0

    def _write_group(self, piece: pa.Table) -> None:
        piece = piece.combine_chunks()
        digests = table_digests(piece)
        assert self._writer is not None and self._schema is not None
        self._writer.write_table(piece, row_group_size=max(1, piece.num_rows))
        self._digests.append([digests[c] for c in self._schema.names])

    def close(self) -> Path:
        """Write what is pending and the digests, and rename the file into place."""
        if self._done:
            return self.path
        try:
            if self._writer is None:
                raise ValueError(f"{self.path}: nothing was written (not even an empty batch to fix the columns)")
            self._flush(final=True)
            assert self._schema is not None
            self._writer.add_key_value_metadata({DIGEST_KEY: canonical_json(
                {"format": TABLE_FORMAT, "columns": self._schema.names, "row_groups": self._digests}).encode("utf-8")})
            self._writer.close()
            self._writer = None
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the temp file; nothing appears under the final name."""
        if self._done:
            return
        self._done = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        try:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def write_feature_table(
    path: str | os.PathLike,
    columns: Mapping[str, Sequence[Any] | np.ndarray],
    arrays: Mapping[str, Sequence[np.ndarray] | np.ndarray],
    provenance: Mapping[str, Any],
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> Path:
    """Atomically write scalar ``columns`` plus per-row ``arrays`` with provenance (one batch)."""
    with FeatureTableWriter(path, provenance, row_group_bytes=row_group_bytes) as w:
        w.write(columns, arrays)
    return Path(path)


def _hash_index(ids: Iterable[Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    h = np.fromiter((hash(i) for i in ids), dtype=np.int64, count=n)
    order = np.argsort(h, kind="stable")
    return h[order], order.astype(np.int32 if n < 2**31 else np.int64)  # 12 bytes an id


class FeatureTable:
    """A Parquet feature table read lazily: scalar columns in memory, array rows by row group.

    ``key``: the id column; ``row(key)`` maps an id to its row (ids must be unique).
    ``verify``: check what is read against the stored digests (a mismatch raises
    :class:`TableError` naming file, column and row group); ``digested`` says whether the
    file has per-row-group digests at all. ``cache_bytes``: decoded row groups kept (LRU);
    ``decoded`` counts row-group decodes (cache misses).
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None, stage: str | None = None,
                 verify: bool = True, cache_bytes: int = CACHE_BYTES) -> None:
        self.path = Path(path)
        self.stage = stage
        _require(self.path, stage)
        try:
            # reads through one 64 KiB buffer rather than a pre-buffer per column chunk: 10 to 20 MB
            # less peak RSS at 200k captions (bench/text_memory.py), the same speed
            self._pf = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 16)
            meta = self._pf.metadata
        except Exception as e:
            raise TableError(f"{self.path}: cannot read Parquet ({type(e).__name__}: {e}){_stage_hint(self.path, stage)}") from e
        self.provenance: dict = read_parquet_provenance(self.path)
        names = self._pf.schema_arrow.names
        self.num_rows = meta.num_rows
        self.num_row_groups = meta.num_row_groups
        self.array_names = [n for n in names if n + SHAPE_SUFFIX in names]
        skip = set(self.array_names) | {n + SHAPE_SUFFIX for n in self.array_names}
        self.scalar_names = [n for n in names if n not in skip]
        raw = (meta.metadata or {}).get(DIGEST_KEY)
        self._digest: dict[str, list[str]] | None = None
        if raw:
            d = json.loads(raw)
            cols, groups = d.get("columns", []), d.get("row_groups", [])
            if len(groups) != self.num_row_groups or any(len(g) != len(cols) for g in groups) or set(cols) != set(names):
                raise TableError(f"{self.path}: the stored digests describe {len(groups)} row group(s) of columns "
                                 f"{cols}, the file has {self.num_row_groups} of {names}: the file is damaged"
                                 f"{_stage_hint(self.path, stage) or '; rerun the stage that writes it'}")
            self._digest = {c: [g[j] for g in groups] for j, c in enumerate(cols)}
        self.digested = self._digest is not None
        self.verify = verify
        self._rg_start = np.concatenate([[0], np.cumsum([meta.row_group(i).num_rows
                                                         for i in range(self.num_row_groups)])]).astype(np.int64)
        self._verified: set[tuple[int, str]] = set()
        self._cache: OrderedDict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_nbytes = 0
        self._freed = 0  # bytes evicted since the allocator was last asked to give memory back
        self.cache_bytes = int(cache_bytes)
        self.decoded = 0
        # scalar columns: small (ids, counts), read whole and checked now
        parts: dict[str, list[pa.Array]] = {n: [] for n in self.scalar_names}
        if self.scalar_names:
            for g in range(self.num_row_groups):
                t = self._read_group(g, self.scalar_names)
                for n in self.scalar_names:
                    parts[n].append(t.column(n).combine_chunks())
        schema = self._pf.schema_arrow
        # one chunk per row group, not concatenated (a copy that mimalloc would keep around)
        self._scalars: dict[str, pa.ChunkedArray] = {
            n: pa.chunked_array(parts[n], schema.field(n).type) for n in self.scalar_names}
        del parts
        self.key = key
        self._index: tuple[np.ndarray, np.ndarray] | None = None
        if key is not None:
            if key not in self._scalars:
                raise TableError(f"{self.path}: no column {key!r} (have: {', '.join(names)})")
            ids = self._scalars[key]
            chunks = (ids.slice(a, 8192).to_pylist() for a in range(0, len(ids), 8192))
            self._index = _hash_index((k for c in chunks for k in c), len(ids))
            hs, rows = self._index
            for j in np.flatnonzero(hs[1:] == hs[:-1]):
                a, b = sorted((int(rows[j]), int(rows[j + 1])))
                if ids[a].as_py() == ids[b].as_py():
                    raise TableError(f"{self.path}: {key} {ids[a].as_py()!r} appears more than once (rows {a} and {b})")

    # ---- reading and checking row groups ----

    def _damaged(self, what: str) -> TableError:
        return TableError(f"{self.path}: {what}: the file is damaged"
                          f"{_stage_hint(self.path, self.stage) or '; rerun the stage that writes it'}")

    def _read_group(self, g: int, columns: Sequence[str]) -> pa.Table:
        """Row group ``g``'s ``columns``, checked against the digests (once per column) when verifying."""
        try:
            t = self._pf.read_row_group(g, columns=list(columns), use_threads=False)
        except Exception as e:
            raise self._damaged(f"row group {g} ({', '.join(columns)}) cannot be read ({type(e).__name__}: {e})") from e
        if self.verify and self._digest is not None:
            for c in columns:
                if (g, c) in self._verified:
                    continue
                if column_digest(t.column(c)) != self._digest[c][g]:
                    raise self._damaged(f"column {c!r}, row group {g}: content does not match its sha256 digest")
                self._verified.add((g, c))
        return t

    def _group(self, g: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, offsets, shapes) of array column ``name`` in row group ``g`` (LRU-cached)."""
        hit = self._cache.get((g, name))
        if hit is not None:
            self._cache.move_to_end((g, name))
            return hit
        t = self._read_group(g, [name, name + SHAPE_SUFFIX])
        entry = self._decode(t, name, g)
        self.decoded += 1
        nbytes = sum(a.nbytes for a in entry)
        self._cache[(g, name)] = entry
        self._cache_nbytes += nbytes
        while self._cache_nbytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            freed = sum(a.nbytes for a in old)
            self._cache_nbytes -= freed
            self._freed += freed
        if self._freed > self.cache_bytes:
            # Arrow's allocator (mimalloc) keeps freed pages unless asked (bench/text_memory.py)
            pa.default_memory_pool().release_unused()
            self._freed = 0
        return entry

    def _decode(self, t: pa.Table, name: str, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        col = t.column(name).combine_chunks()
        shp = t.column(name + SHAPE_SUFFIX).combine_chunks()
        offsets = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
        offsets = offsets - offsets[0]
        values = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
        if values.dtype.kind == "f" and values.dtype != np.float32:
            values = values.astype(np.float32)
        ndim = shp.type.list_size
        shapes = np.asarray(shp.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).reshape(len(shp), ndim)
        if len(offsets) != t.num_rows + 1 or np.any(np.prod(shapes, axis=1) != np.diff(offsets)):
            raise self._damaged(f"column {name!r}, row group {g}: shapes do not match the stored values")
        return values, offsets, shapes

    def iter_groups(self, name: str, groups: Iterable[int] | None = None
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(first_row, values, offsets, shapes)`` per row group of array column ``name`` (not cached);
        ``groups``: only those row groups, in the order given (default: all)."""
        for g in range(self.num_row_groups) if groups is None else groups:
            g = int(g)
            yield int(self._rg_start[g]), *self._decode(self._read_group(g, [name, name + SHAPE_SUFFIX]), name, g)

    def groups_of(self, rows: np.ndarray) -> np.ndarray:
        """The row groups (sorted, unique) that hold the row numbers ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.path}: row numbers outside 0..{self.num_rows - 1}")
        return np.unique(np.searchsorted(self._rg_start, rows, side="right") - 1)

    def verify_all(self) -> list[str]:
        """Every column of every row group against the digests: problems ([] when all match)."""
        if self._digest is None:
            return []
        problems = []
        for g in range(self.num_row_groups):
            try:
                t = self._pf.read_row_group(g)
            except Exception as e:
                problems.append(f"{self.path}: row group {g} cannot be read ({type(e).__name__}: {e})")
                continue
            for c in t.column_names:
                if column_digest(t.column(c)) != self._digest[c][g]:
                    problems.append(f"{self.path}: column {c!r}, row group {g}: content does not match its sha256 "
                                    f"digest: the file is damaged; rerun the stage that writes it")
                else:
                    self._verified.add((g, c))
            del t
        return problems

    # ---- the public reading API ----

    def __len__(self) -> int:
        return self.num_rows

    def __contains__(self, k: object) -> bool:
        return self._find(k) is not None

    def _find(self, k: Any) -> int | None:
        if self._index is None:
            return None
        try:
            h = hash(k)
        except TypeError:
            return None
        hs, rows = self._index
        i = int(np.searchsorted(hs, h))
        ids = self._scalars[self.key]  # type: ignore[index]
        while i < len(hs) and hs[i] == h:
            r = int(rows[i])
            if ids[r].as_py() == k:
                return r
            i += 1
        return None

    @cached_property
    def columns(self) -> dict[str, list]:
        """Scalar columns as Python lists (built on first use: for inspection)."""
        return {n: a.to_pylist() for n, a in self._scalars.items()}

    def column(self, name: str) -> pa.ChunkedArray:
        """Scalar column ``name`` (Arrow, one chunk per row group: compact)."""
        return self._scalars[name]

    @property
    def keys(self) -> list:
        return self._scalars[self.key].to_pylist() if self.key else list(range(self.num_rows))

    def row(self, k: Any) -> int:
        r = self._find(k)
        if r is None:
            raise KeyError(f"{self.key} {k!r} not in {self.path} ({self.num_rows} rows)")
        return r

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"{self.path}: row {row} out of range ({self.num_rows} rows)")
        g = int(np.searchsorted(self._rg_start, row, side="right")) - 1
        return g, row - int(self._rg_start[g])

    def array(self, name: str, row: int) -> np.ndarray:
        """Row ``row`` of array column ``name``, with its shape (a copy)."""
        g, r = self._locate(row)
        values, offsets, shapes = self._group(g, name)
        return values[offsets[r]:offsets[r + 1]].reshape(shapes[r]).copy()

    def shape(self, name: str, row: int) -> tuple[int, ...]:
        g, r = self._locate(row)
        return tuple(int(x) for x in self._group(g, name)[2][r])

    def shapes(self, name: str) -> np.ndarray:
        """(N, ndim) shapes of array column ``name`` (reads that column's shapes only)."""
        col = self._pf.read(columns=[name + SHAPE_SUFFIX]).column(0)
        ndim = col.type.list_size
        flat = np.asarray(col.combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
        return flat.reshape(self.num_rows, ndim)

    def value_dtype(self, name: str) -> np.dtype:
        """dtype the values of array column ``name`` come back in."""
        t = self._pf.schema_arrow.field(name).type.value_type
        return np.dtype(np.float32) if pa.types.is_floating(t) else np.dtype(t.to_pandas_dtype())

    def stored_dtype(self, name: str) -> np.dtype:
        """dtype the values of array column ``name`` are stored in (float16 or float32 for floats)."""
        return np.dtype(self._pf.schema_arrow.field(name).type.value_type.to_pandas_dtype())

    def values(self, name: str) -> np.ndarray:
        """All values of array column ``name``, flattened (reads the whole column)."""
        parts = [v for _, v, _, _ in self.iter_groups(name)]
        return np.concatenate(parts) if parts else np.zeros(0, self.value_dtype(name))

    def stack(self, name: str) -> np.ndarray:
        """Array column ``name`` as one (N, ...) array (reads the whole column); rows must share a shape."""
        out: np.ndarray | None = None
        first_shape = None
        for start, values, _, shapes in self.iter_groups(name):
            if not len(shapes):
                continue
            if first_shape is None:
                first_shape = tuple(shapes[0])
                out = np.empty((self.num_rows, *first_shape), dtype=values.dtype)
            if np.any(shapes != np.asarray(first_shape)):
                raise TableError(f"{self.path}: column {name!r} has rows of different shapes; cannot stack")
            out[start:start + len(shapes)] = values.reshape(len(shapes), *first_shape)  # type: ignore[index]
        return out if out is not None else np.zeros(0, self.value_dtype(name))


# ---- text features (MNER) --------------------------------------------------------------------

WORDS_FILE = "words.parquet"
TYPE_PROMPTS_FILE = "type_prompts.parquet"
STATES_FILE = "states.parquet"  # only with text.tune_top > 0
BATCH_ROWS = 256  # rows handed to the table writer at a time


def _stage_for(d: Path, name: str) -> str:
    return f"{name}@{d.parent.name}" if d.parent.name else name


class TextFeaturesWriter(_Writer):
    """Write ``dir/words.parquet`` (and ``dir/states.parquet``) sample by sample, then ``dir/type_prompts.parquet``.

    ``add(row)`` takes one sample (see :func:`write_text_features`); memory holds at most a
    batch of rows and one row group per file. Use as a context manager: on an error no file
    is replaced; on success each file is renamed into place (states, words, then prompts).
    ``dtype``: storage precision of the word features and states (``text.dtype``; the type
    prompts, a few rows, stay float32); readers get float32 back.
    """

    def __init__(self, dir: str | os.PathLike, type_prompts: Mapping[str, np.ndarray], provenance: Mapping[str, Any],
                 row_group_bytes: int = ROW_GROUP_BYTES, dtype: str = "float32") -> None:
        self.dir = Path(dir)
        self._dtype = dtype
        self._prov = dict(provenance)
        self._rg = row_group_bytes
        self._types = [str(t) for t in type_prompts]
        self._prompts = [np.asarray(type_prompts[t]) for t in type_prompts]
        self._inner: tuple[int, ...] | None = None
        self._words = FeatureTableWriter(self.dir / WORDS_FILE, self._prov, key="sample_id", row_group_bytes=self._rg,
                                         float_dtype=dtype)
        self._states: FeatureTableWriter | None = None
        self._buf: list[tuple[str, int, int, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self.n = 0
        self.n_states = 0
        self._done = False
        self._check_prompts()

    def _check_prompts(self) -> None:
        for t, p in zip(self._types, self._prompts):
            if p.ndim != 2 or (self._inner is not None and p.shape != self._inner):
                raise ValueError(f"type prompt {t!r}: shape {p.shape}, expected (n_layers, d) = {self._inner}")

    def add(self, r: Mapping[str, Any]) -> None:
        """One sample: ``sample_id``, ``n_words``, ``feats`` (n_kept, n_layers, d), optional ``n_kept``,
        ``states`` (n_subwords, d) and ``first`` (n_kept,)."""
        sid, f = str(r["sample_id"]), np.asarray(r["feats"])
        if f.ndim != 3:
            raise ValueError(f"text features of {sid!r}: feats must be (n_kept, n_layers, d), got {f.shape}")
        if self._inner is None:
            self._inner = f.shape[1:]
            self._check_prompts()
        elif f.shape[1:] != self._inner:
            raise ValueError(f"text features of {sid!r}: (n_layers, d) = {f.shape[1:]}, other samples have {self._inner}")
        kept = int(r.get("n_kept", f.shape[0]))
        if kept != f.shape[0] or not 0 <= kept <= int(r["n_words"]):
            raise ValueError(f"text features of {sid!r}: n_kept={kept}, feats rows={f.shape[0]}, n_words={r['n_words']}")
        st = first = None
        if r.get("states") is not None:
            st, first = np.asarray(r["states"]), np.asarray(r["first"], dtype=np.int32)
            if st.ndim != 2 or st.shape[1] != f.shape[2] or first.shape != (kept,) or (
                    kept and (first.min() < 0 or first.max() >= st.shape[0] or np.any(np.diff(first) <= 0))):
                raise ValueError(f"text features of {sid!r}: states {st.shape} / first {first.shape} do not fit "
                                 f"{kept} kept words of size {f.shape[2]} (first must rise inside the states)")
            self.n_states += 1
        if (st is None) != (self.n_states == 0):
            raise ValueError(f"text features: {self.n_states} of {self.n + 1} samples have sub-word states; "
                             f"all or none must")
        self._buf.append((sid, int(r["n_words"]), kept, f, st, first))
        self.n += 1
        if len(self._buf) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._buf and self._words.num_rows:
            return
        b = self._buf
        ids = pa.array([x[0] for x in b], pa.string())
        self._words.write({"sample_id": ids, "n_words": pa.array([x[1] for x in b], pa.int32()),
                           "n_kept": pa.array([x[2] for x in b], pa.int32())},
                          {"feats": [x[3] for x in b]}, ndims={"feats": 3})
        if self.n_states and b:
            if self._states is None:
                self._states = FeatureTableWriter(self.dir / STATES_FILE, self._prov, key="sample_id",
                                                  row_group_bytes=self._rg, float_dtype=self._dtype)
            self._states.write({"sample_id": ids}, {"states": [x[4] for x in b], "first": [x[5] for x in b]})
        self._buf = []

    def close(self) -> Path:
        if self._done:
            return self.dir
        try:
            self._flush()
            if self.n_states and self.n_states != self.n:
                raise ValueError(f"text features: {self.n_states} of {self.n} samples have sub-word states; all or none must")
            if self._states is not None:
                self._states.close()
            self._words.close()
            write_feature_table(self.dir / TYPE_PROMPTS_FILE, {"type": pa.array(self._types, pa.string())},
                                {"feats": self._prompts}, self._prov)
        except BaseException:
            self.abort()
            raise
        self._done = True
        if self._states is None and (self.dir / STATES_FILE).exists():
            (self.dir / STATES_FILE).unlink()  # a frozen run must not leave an older run's states behind
        return self.dir

    def abort(self) -> None:
        self._done = True
        for w in (self._words, self._states):
            if w is not None:
                w.abort()


def write_text_features(
    dir: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    type_prompts: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    row_group_bytes: int = ROW_GROUP_BYTES,
    dtype: str = "float32",
) -> Path:
    """Write ``dir/words.parquet`` and ``dir/type_prompts.parquet`` (and ``dir/states.parquet``).

    ``rows`` (any iterable: a generator keeps memory flat): dicts with ``sample_id``,
    ``n_words`` (words in the sample), ``feats`` (n_kept, n_layers, d) (first sub-word of each
    kept word) and optionally ``n_kept``; rows that also hold ``states`` (n_subwords, d) and
    ``first`` (n_kept,) (the input of the encoder's top layers and each word's first-sub-word
    position) go to ``states.parquet``. ``type_prompts``: entity type -> (n_layers, d).
    ``dtype``: float32 or float16 storage of feats and states (read back as float32).
    """
    with TextFeaturesWriter(dir, type_prompts, provenance, row_group_bytes=row_group_bytes, dtype=dtype) as w:
        for r in rows:
            w.add(r)
    return Path(dir)


class TextFeatures:
    """Word features per sample and type-prompt features, from the ``text`` stage (read lazily)."""

    def __init__(self, dir: str | os.PathLike, cache_bytes: int = CACHE_BYTES) -> None:
        d = Path(dir)
        stage = _stage_for(d, "text")
        if not d.is_dir():
            raise TableError(f"{d}: text feature dir not found{_stage_hint(d, stage)}")
        self.dir = d
        self._words = _require_digests(FeatureTable(d / WORDS_FILE, key="sample_id", stage=stage,
                                                    cache_bytes=cache_bytes), stage)
        self._types = _require_digests(FeatureTable(d / TYPE_PROMPTS_FILE, key="type", stage=stage), stage)
        if self._words.provenance != self._types.provenance:
            raise TableError(f"{d}: {WORDS_FILE} and {TYPE_PROMPTS_FILE} come from different runs "
                             f"(provenance differs); rerun `dvc repro {stage}`")
        self.provenance: dict = self._words.provenance
        self._n_words = self._words.column("n_words").to_numpy().astype(np.int32, copy=False)  # (N,)
        self._n_kept = (self._words.column("n_kept").to_numpy().astype(np.int32, copy=False)
                        if "n_kept" in self._words.scalar_names else None)
        self._states: FeatureTable | None = None
        if (d / STATES_FILE).is_file():
            # written beside words.parquet row for row: the same ids in the same order share its index
            self._states = _require_digests(FeatureTable(d / STATES_FILE, stage=stage, cache_bytes=cache_bytes), stage)
            if self._states.provenance != self.provenance:
                raise TableError(f"{d}: {STATES_FILE} and {WORDS_FILE} come from different runs "
                                 f"(provenance differs); rerun `dvc repro {stage}`")
            if not self._states.column("sample_id").equals(self._words.column("sample_id")):
                raise TableError(f"{d}: {STATES_FILE} does not hold the samples of {WORDS_FILE} in the same order; "
                                 f"rerun `dvc repro {stage}`")
        self.type_prompts: dict[str, np.ndarray] = {
            t: self._types.array("feats", i) for i, t in enumerate(self._types.columns["type"])}

    @property
    def sample_ids(self) -> list[str]:
        return self._words.keys

    @property
    def types(self) -> list[str]:
        return list(self.type_prompts)

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.type_prompts.values())).shape[0]) if self.type_prompts else 0

    @property
    def dim(self) -> int:
        return int(next(iter(self.type_prompts.values())).shape[1]) if self.type_prompts else 0

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._words

    def get(self, sample_id: str) -> np.ndarray:
        """(n_kept_words, n_layers, d) float32."""
        return self._words.array("feats", self._words.row(sample_id))

    def n_words(self, sample_id: str) -> int:
        """Words in the sample (words past ``n_kept`` were cut by the encoder's length limit)."""
        return int(self._n_words[self._words.row(sample_id)])

    def n_kept(self, sample_id: str) -> int:
        r = self._words.row(sample_id)
        return int(self._n_kept[r]) if self._n_kept is not None else self._words.shape("feats", r)[0]

    @property
    def has_states(self) -> bool:
        """True when the cache holds the sub-word input of the encoder's top layers (``text.tune_top`` > 0)."""
        return self._states is not None

    def states(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(n_subwords, d) float32 input of the top layers and (n_kept,) first-sub-word positions."""
        if self._states is None:
            raise TableError(f"{self.dir}: no {STATES_FILE} (the text stage ran with text.tune_top: 0)")
        r = self._words.row(sample_id)  # the same row in both files
        return self._states.array("states", r), self._states.array("first", r)

    def nbytes(self, sample_ids: Sequence[str], states: bool = False) -> int:
        """float32 bytes of these samples' word features (and states): what reading them all costs."""
        rows = np.fromiter((self._words.row(s) for s in sample_ids), dtype=np.int64, count=len(sample_ids))
        total = int(np.prod(self._words.shapes("feats")[rows], axis=1).sum())
        if states and self._states is not None:
            total += int(np.prod(self._states.shapes("states")[rows], axis=1).sum())
        return 4 * total

    @property
    def table(self) -> FeatureTable:
        """The underlying words table (for inspection)."""
        return self._words

    @property
    def states_table(self) -> FeatureTable | None:
        return self._states

    @property
    def prompt_table(self) -> FeatureTable:
        return self._types


# ---- caption features (retrieval / EGR) ----------------------------------------------------------

CAPTIONS_FILE = "captions.parquet"


class CaptionFeaturesWriter(_Writer):
    """Write ``dir/captions.parquet`` batch by batch (a context manager, atomic like :class:`FeatureTableWriter`).

    ``dtype``: float32 or float16 storage (``captions.dtype``); readers get float32 back.
    """

    def __init__(self, dir: str | os.PathLike, provenance: Mapping[str, Any],
                 row_group_bytes: int = ROW_GROUP_BYTES, dtype: str = "float32") -> None:
        self.dir = Path(dir)
        self._w = FeatureTableWriter(self.dir / CAPTIONS_FILE, provenance, key="caption_id",
                                     row_group_bytes=row_group_bytes, float_dtype=dtype)
        self._dims: tuple[int, int] | None = None  # (S, D)

    def add(self, caption_ids: Sequence[str], emb: np.ndarray, prompt_emb: np.ndarray, mask_emb: np.ndarray,
            n_entities: Sequence[int] | np.ndarray) -> None:
        """A batch: emb (B, D), prompt_emb (B, S, D), mask_emb (B, S, D), n_entities (B,)."""
        ids = [str(c) for c in caption_ids]
        n = len(ids)
        emb, prompt_emb, mask_emb = np.asarray(emb), np.asarray(prompt_emb), np.asarray(mask_emb)
        n_entities = np.asarray(n_entities, dtype=np.int64).reshape(-1)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"caption features: emb must be (N={n}, D), got {emb.shape}")
        for name, a in (("prompt_emb", prompt_emb), ("mask_emb", mask_emb)):
            if a.ndim != 3 or a.shape[0] != n or a.shape[2] != emb.shape[1]:
                raise ValueError(f"caption features: {name} must be (N={n}, S, D={emb.shape[1]}), got {a.shape}")
        if prompt_emb.shape[1] != mask_emb.shape[1]:
            raise ValueError(f"caption features: prompt_emb has {prompt_emb.shape[1]} slots, mask_emb {mask_emb.shape[1]}")
        if n_entities.shape != (n,) or np.any(n_entities < 0):
            raise ValueError(f"caption features: n_entities must be (N={n},) and >= 0")
        if len(set(ids)) != n:
            raise ValueError(f"caption features: duplicate caption ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
        dims = (prompt_emb.shape[1], emb.shape[1])
        if n and self._dims is not None and dims != self._dims:
            raise ValueError(f"caption features: (S, D) = {dims}, earlier batches have {self._dims}")
        if n or self._dims is None:
            self._dims = dims if n else self._dims
            self._w.write({"caption_id": pa.array(ids, pa.string()), "n_entities": pa.array(n_entities, pa.int32())},
                          {"emb": emb, "prompt_emb": prompt_emb, "mask_emb": mask_emb})

    def close(self) -> Path:
        if self._w._writer is None and not self._w._done:  # no batch at all: an empty, typed table
            self.add([], np.zeros((0, 0)), np.zeros((0, 0, 0)), np.zeros((0, 0, 0)), [])
        self._w.close()
        return self.dir

    def abort(self) -> None:
        self._w.abort()


def write_caption_features(
    dir: str | os.PathLike,
    caption_ids: Sequence[str],
    emb: np.ndarray,
    prompt_emb: np.ndarray,
    mask_emb: np.ndarray,
    n_entities: Sequence[int] | np.ndarray,
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``dir/captions.parquet``: emb (N,D), prompt_emb (N,S,D), mask_emb (N,S,D), n_entities (N,)."""
    with CaptionFeaturesWriter(dir, provenance) as w:
        w.add(caption_ids, emb, prompt_emb, mask_emb, n_entities)
    return Path(dir)


class CaptionFeatures:
    """Caption, entity-prompt and masked-caption embeddings, from the ``captions`` stage.

    ``get(caption_id)`` reads one caption lazily; ``emb``, ``prompt_emb`` and ``mask_emb``
    are the whole (N, ...) arrays, read on first use (exact search over all captions needs them).
    """

    def __init__(self, dir: str | os.PathLike, cache_bytes: int = CACHE_BYTES) -> None:
        d = Path(dir)
        stage = _stage_for(d, "captions")
        if not d.is_dir():
            raise TableError(f"{d}: caption feature dir not found{_stage_hint(d, stage)}")
        self.dir = d
        t = _require_digests(FeatureTable(d / CAPTIONS_FILE, key="caption_id", stage=stage,
                                          cache_bytes=cache_bytes), stage)
        self._table = t
        self.provenance: dict = t.provenance
        self.n_entities: np.ndarray = t.column("n_entities").to_numpy().astype(np.int64, copy=False)  # (N,)

    @cached_property
    def caption_ids(self) -> list[str]:
        return self._table.keys

    @cached_property
    def emb(self) -> np.ndarray:
        return self._table.stack("emb")  # (N, D) float32

    @cached_property
    def prompt_emb(self) -> np.ndarray:
        return self._table.stack("prompt_emb")  # (N, S, D)

    @cached_property
    def mask_emb(self) -> np.ndarray:
        return self._table.stack("mask_emb")  # (N, S, D)

    def get(self, caption_id: str) -> dict[str, Any]:
        """One caption: emb (D,), prompt_emb (S, D), mask_emb (S, D) float32 and n_entities."""
        r = self._table.row(caption_id)
        return {"emb": self._table.array("emb", r), "prompt_emb": self._table.array("prompt_emb", r),
                "mask_emb": self._table.array("mask_emb", r), "n_entities": int(self.n_entities[r])}

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, caption_id: object) -> bool:
        return caption_id in self._table

    def index(self, caption_id: str) -> int:
        """Row of ``caption_id`` in the arrays."""
        return self._table.row(caption_id)

    @property
    def table(self) -> FeatureTable:
        return self._table


# ---- prepared manifests ------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """A prepared manifest (``data/prepared/<ds>/*.parquet``) as a pyarrow Table."""
    p = Path(path)
    stage = f"prepare@{p.parent.name}" if p.parent.name else "prepare"
    _require(p, stage)
    try:
        table = pq.read_table(p, columns=list(columns) if columns else None)
    except Exception as e:
        raise TableError(f"{p}: cannot read manifest ({type(e).__name__}: {e})") from e
    return table


def manifest_rows(path: str | os.PathLike, columns: Sequence[str] | None = None) -> list[dict]:
    """A prepared manifest as a list of dicts."""
    return read_manifest(path, columns).to_pylist()


def manifest_chunks(table: pa.Table, columns: Sequence[str], rows: int = 4096) -> Iterator[dict[str, list]]:
    """A manifest table's ``columns`` as Python lists, ``rows`` rows at a time (the table stays Arrow)."""
    sel = table.select(list(columns))
    for start in range(0, table.num_rows, rows):
        yield sel.slice(start, rows).to_pydict()
