"""Parquet feature tables with provenance: text features, caption features, manifests.

A row may hold ndarrays of any shape. Each array column ``name`` is stored as
``large_list<float32>`` (the flattened values) plus ``name_shape``
(``fixed_size_list<int32>[ndim]``), so the file stays typed and readable by any Parquet
tool. At open, a :class:`FeatureTable` keeps the flat values, offsets and shapes of each
array column, so reading one row by key is an O(1) slice. Floating arrays come back as
float32. Provenance lives in the schema metadata (``pipeline.artifacts.write_parquet``).

Contents are verified, not assumed: ``write_feature_table`` stores a sha256 of each
column's values in the schema metadata (``content_sha256``), and :class:`FeatureTable`
checks every column against it when it loads the file (it reads the whole table anyway),
raising :class:`TableError` naming the file and the columns that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import canonical_json, read_parquet_provenance, write_parquet

SHAPE_SUFFIX = "_shape"
DIGEST_KEY = b"content_sha256"  # schema metadata: JSON {column: sha256 of its values}


class TableError(RuntimeError):
    """A feature table or manifest is missing or inconsistent."""


def _stage_hint(path: Path, stage: str | None) -> str:
    return f"; it is written by the `{stage.split('@')[0]}` stage (run `dvc repro {stage}`)" if stage else ""


def _require(path: Path, stage: str | None) -> None:
    if not path.is_file():
        raise TableError(f"{path}: not found{_stage_hint(path, stage)}")


def _require_digests(t: FeatureTable, stage: str | None) -> FeatureTable:
    """A feature cache must carry digests: one written without them is refused, not trusted."""
    if not t.digested:
        raise TableError(f"{t.path}: no content digest (written before feature tables stored digests); "
                         f"rebuild it{_stage_hint(t.path, stage)}")
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


def table_digests(table: pa.Table) -> dict[str, str]:
    """``{column: sha256 of its values}``: what ``write_feature_table`` stores and ``FeatureTable`` checks."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        h = hashlib.sha256()
        _hash_values(h, col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())
        out[name] = h.hexdigest()
    return out


def stored_digests(schema: pa.Schema) -> dict[str, str] | None:
    """The digests in a table's schema metadata, None if it was written without them."""
    raw = (schema.metadata or {}).get(DIGEST_KEY)
    return json.loads(raw) if raw else None


def digest_problems(table: pa.Table) -> list[str]:
    """Columns whose values do not match the stored digests ([] if all do, or none are stored)."""
    want = stored_digests(table.schema)
    if want is None:
        return []
    got = table_digests(table)
    return [f"column {c!r}: " + ("missing" if c not in got else "not in the stored digests" if c not in want
                                 else "content does not match its sha256 digest")
            for c in sorted(set(want) | set(got)) if want.get(c) != got.get(c)]


# ---- generic array columns ------------------------------------------------------------------

def _as_value_dtype(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "biu":
        return a
    raise ValueError(f"dtype {a.dtype} cannot be stored in an array column")


def array_columns(name: str, arrays: Sequence[np.ndarray] | np.ndarray) -> dict[str, pa.Array]:
    """``{name: large_list<values>, name_shape: fixed_size_list<int32>[ndim]}`` for per-row arrays.

    ``arrays``: a sequence of arrays of one ndim (shapes may differ), or one stacked
    (N, ...) ndarray (every row then has shape ``arrays.shape[1:]``).
    """
    if isinstance(arrays, np.ndarray):
        if arrays.ndim < 2:
            raise ValueError(f"column {name!r}: a stacked array needs shape (N, ...), got {arrays.shape}")
        n, row_shape = arrays.shape[0], arrays.shape[1:]
        values = _as_value_dtype(np.ascontiguousarray(arrays)).reshape(-1)
        sizes = np.full(n, int(np.prod(row_shape)), dtype=np.int64)
        shapes = np.tile(np.asarray(row_shape, dtype=np.int32), (n, 1))
        ndim = len(row_shape)
    else:
        rows = [np.asarray(a) for a in arrays]
        ndims = {a.ndim for a in rows}
        if len(ndims) > 1:
            raise ValueError(f"column {name!r}: rows have different ndim {sorted(ndims)}")
        ndim = ndims.pop() if ndims else 1
        if ndim == 0:
            raise ValueError(f"column {name!r}: rows must be arrays (ndim >= 1), not scalars")
        kinds = {_as_value_dtype(a).dtype for a in rows}
        if len(kinds) > 1:
            raise ValueError(f"column {name!r}: rows have different dtypes {sorted(map(str, kinds))}")
        dtype = kinds.pop() if kinds else np.dtype(np.float32)
        values = np.concatenate([_as_value_dtype(a).reshape(-1) for a in rows]) if rows else np.zeros(0, dtype)
        sizes = np.array([a.size for a in rows], dtype=np.int64)
        shapes = np.array([a.shape for a in rows], dtype=np.int32).reshape(len(rows), ndim)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    shape_col = pa.FixedSizeListArray.from_arrays(pa.array(shapes.reshape(-1), pa.int32()), ndim)
    return {name: lists, name + SHAPE_SUFFIX: shape_col}


def write_feature_table(
    path: str | os.PathLike,
    columns: Mapping[str, Sequence[Any] | np.ndarray],
    arrays: Mapping[str, Sequence[np.ndarray] | np.ndarray],
    provenance: Mapping[str, Any],
) -> Path:
    """Atomically write scalar ``columns`` plus per-row ``arrays`` with provenance."""
    data: dict[str, pa.Array] = {}
    for k, v in columns.items():
        if isinstance(v, (pa.Array, pa.ChunkedArray)):
            data[k] = v
        else:
            data[k] = pa.array(v.tolist() if isinstance(v, np.ndarray) else list(v))
    for k, v in arrays.items():
        if k in data or k + SHAPE_SUFFIX in data:
            raise ValueError(f"{path}: column {k!r} given twice")
        data.update(array_columns(k, v))
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: columns have different lengths {lengths}")
    table = pa.table(data)
    table = table.replace_schema_metadata({DIGEST_KEY: canonical_json(table_digests(table)).encode("utf-8")})
    return write_parquet(table, path, dict(provenance))


class FeatureTable:
    """A Parquet feature table in memory: scalar columns plus O(1) per-row arrays.

    ``key``: the id column; ``row(key)`` maps an id to its row (ids must be unique).
    ``verify``: check the columns against the stored digests (a mismatch raises
    :class:`TableError`); ``digested`` says whether the file has digests at all.
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None, stage: str | None = None,
                 verify: bool = True) -> None:
        self.path = Path(path)
        _require(self.path, stage)
        try:
            table = pq.read_table(self.path)
        except Exception as e:
            raise TableError(f"{self.path}: cannot read Parquet ({type(e).__name__}: {e}){_stage_hint(self.path, stage)}") from e
        self.digested = stored_digests(table.schema) is not None
        if verify and (bad := digest_problems(table)):
            raise TableError(f"{self.path}: {'; '.join(bad)}: the file is damaged"
                             f"{_stage_hint(self.path, stage) or '; rerun the stage that writes it'}")
        self.provenance: dict = read_parquet_provenance(self.path)
        self.num_rows = table.num_rows
        names = table.column_names
        self.array_names = [n for n in names if n + SHAPE_SUFFIX in names]
        skip = set(self.array_names) | {n + SHAPE_SUFFIX for n in self.array_names}
        self.columns: dict[str, list] = {n: table.column(n).to_pylist() for n in names if n not in skip}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for n in self.array_names:
            col = table.column(n).combine_chunks()
            shp = table.column(n + SHAPE_SUFFIX).combine_chunks()
            offsets = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
            values = np.array(col.values.to_numpy(zero_copy_only=False))  # owned, writable
            ndim = shp.type.list_size
            shapes = np.asarray(shp.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).reshape(len(shp), ndim)
            if len(offsets) != self.num_rows + 1 or np.any(np.prod(shapes, axis=1) != np.diff(offsets)):
                raise TableError(f"{self.path}: column {n!r}: shapes do not match the stored values")
            self._arrays[n] = (values, offsets, shapes)
        del table
        self.key = key
        self._row: dict[str, int] = {}
        if key is not None:
            if key not in self.columns:
                raise TableError(f"{self.path}: no column {key!r} (have: {', '.join(names)})")
            for i, k in enumerate(self.columns[key]):
                if k in self._row:
                    raise TableError(f"{self.path}: {key} {k!r} appears more than once (rows {self._row[k]} and {i})")
                self._row[k] = i

    def __len__(self) -> int:
        return self.num_rows

    def __contains__(self, k: object) -> bool:
        return k in self._row

    @property
    def keys(self) -> list:
        return list(self.columns[self.key]) if self.key else list(range(self.num_rows))

    def row(self, k: Any) -> int:
        try:
            return self._row[k]
        except KeyError:
            raise KeyError(f"{self.key} {k!r} not in {self.path} ({self.num_rows} rows)") from None

    def array(self, name: str, row: int) -> np.ndarray:
        """Row ``row`` of array column ``name``, with its shape (a copy)."""
        values, offsets, shapes = self._arrays[name]
        return values[offsets[row]:offsets[row + 1]].reshape(shapes[row]).copy()

    def shape(self, name: str, row: int) -> tuple[int, ...]:
        return tuple(int(x) for x in self._arrays[name][2][row])

    def shapes(self, name: str) -> np.ndarray:
        """(N, ndim) shapes of array column ``name``."""
        return self._arrays[name][2]

    def values(self, name: str) -> np.ndarray:
        """All values of array column ``name``, flattened (for stats and checks)."""
        return self._arrays[name][0]

    def stack(self, name: str) -> np.ndarray:
        """Array column ``name`` as one (N, ...) array; all rows must share a shape."""
        values, _, shapes = self._arrays[name]
        if len(shapes) == 0:
            return values.reshape(0)
        if np.any(shapes != shapes[0]):
            raise TableError(f"{self.path}: column {name!r} has rows of different shapes; cannot stack")
        return values.reshape(len(shapes), *shapes[0])


# ---- text features (MNER) --------------------------------------------------------------------

WORDS_FILE = "words.parquet"
TYPE_PROMPTS_FILE = "type_prompts.parquet"
STATES_FILE = "states.parquet"  # only with text.tune_top > 0


def _stage_for(d: Path, name: str) -> str:
    return f"{name}@{d.parent.name}" if d.parent.name else name


def write_text_features(
    dir: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    type_prompts: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``dir/words.parquet`` and ``dir/type_prompts.parquet`` (and ``dir/states.parquet``).

    ``rows``: dicts with ``sample_id``, ``n_words`` (words in the sample), ``feats``
    (n_kept, n_layers, d) (first sub-word of each kept word) and optionally ``n_kept``; rows
    that also hold ``states`` (n_subwords, d) and ``first`` (n_kept,) (the input of the
    encoder's top layers and each word's first-sub-word position) go to ``states.parquet``.
    ``type_prompts``: entity type -> (n_layers, d).
    """
    d = Path(dir)
    ids, n_words, n_kept, feats, states, firsts = [], [], [], [], [], []
    inner: tuple[int, int] | None = None
    for r in rows:
        sid, f = str(r["sample_id"]), np.asarray(r["feats"])
        if f.ndim != 3:
            raise ValueError(f"text features of {sid!r}: feats must be (n_kept, n_layers, d), got {f.shape}")
        if inner is None:
            inner = f.shape[1:]
        elif f.shape[1:] != inner:
            raise ValueError(f"text features of {sid!r}: (n_layers, d) = {f.shape[1:]}, other samples have {inner}")
        kept = int(r.get("n_kept", f.shape[0]))
        if kept != f.shape[0] or not 0 <= kept <= int(r["n_words"]):
            raise ValueError(f"text features of {sid!r}: n_kept={kept}, feats rows={f.shape[0]}, n_words={r['n_words']}")
        ids.append(sid)
        n_words.append(int(r["n_words"]))
        n_kept.append(kept)
        feats.append(f)
        if r.get("states") is not None:
            st, first = np.asarray(r["states"]), np.asarray(r["first"], dtype=np.int32)
            if st.ndim != 2 or st.shape[1] != f.shape[2] or first.shape != (kept,) or (
                    kept and (first.min() < 0 or first.max() >= st.shape[0] or np.any(np.diff(first) <= 0))):
                raise ValueError(f"text features of {sid!r}: states {st.shape} / first {first.shape} do not fit "
                                 f"{kept} kept words of size {f.shape[2]} (first must rise inside the states)")
            states.append(st)
            firsts.append(first)
    if states and len(states) != len(ids):
        raise ValueError(f"text features: {len(states)} of {len(ids)} samples have sub-word states; all or none must")
    if len(set(ids)) != len(ids):
        raise ValueError(f"text features: duplicate sample ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    types = [str(t) for t in type_prompts]
    prompts = [np.asarray(type_prompts[t]) for t in type_prompts]
    for t, p in zip(types, prompts):
        if p.ndim != 2 or (inner is not None and p.shape != inner):
            raise ValueError(f"type prompt {t!r}: shape {p.shape}, expected (n_layers, d) = {inner}")
    write_feature_table(d / WORDS_FILE,
                        {"sample_id": pa.array(ids, pa.string()), "n_words": pa.array(n_words, pa.int32()),
                         "n_kept": pa.array(n_kept, pa.int32())},
                        {"feats": feats}, provenance)
    write_feature_table(d / TYPE_PROMPTS_FILE, {"type": pa.array(types, pa.string())}, {"feats": prompts}, provenance)
    if states:
        write_feature_table(d / STATES_FILE, {"sample_id": pa.array(ids, pa.string())},
                            {"states": states, "first": firsts}, provenance)
    elif (d / STATES_FILE).exists():
        (d / STATES_FILE).unlink()  # a frozen run must not leave an older run's states behind
    return d


class TextFeatures:
    """Word features per sample and type-prompt features, from the ``text`` stage."""

    def __init__(self, dir: str | os.PathLike) -> None:
        d = Path(dir)
        stage = _stage_for(d, "text")
        if not d.is_dir():
            raise TableError(f"{d}: text feature dir not found{_stage_hint(d, stage)}")
        self.dir = d
        self._words = _require_digests(FeatureTable(d / WORDS_FILE, key="sample_id", stage=stage), stage)
        self._types = _require_digests(FeatureTable(d / TYPE_PROMPTS_FILE, key="type", stage=stage), stage)
        if self._words.provenance != self._types.provenance:
            raise TableError(f"{d}: {WORDS_FILE} and {TYPE_PROMPTS_FILE} come from different runs "
                             f"(provenance differs); rerun `dvc repro {stage}`")
        self.provenance: dict = self._words.provenance
        self._n_words = self._words.columns["n_words"]
        self._states: FeatureTable | None = None
        if (d / STATES_FILE).is_file():
            self._states = _require_digests(FeatureTable(d / STATES_FILE, key="sample_id", stage=stage), stage)
            if self._states.provenance != self.provenance:
                raise TableError(f"{d}: {STATES_FILE} and {WORDS_FILE} come from different runs "
                                 f"(provenance differs); rerun `dvc repro {stage}`")
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
        return int(self._types.shapes("feats")[0][0]) if len(self._types) else 0

    @property
    def dim(self) -> int:
        return int(self._types.shapes("feats")[0][1]) if len(self._types) else 0

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
        return self._words.shape("feats", self._words.row(sample_id))[0]

    @property
    def has_states(self) -> bool:
        """True when the cache holds the sub-word input of the encoder's top layers (``text.tune_top`` > 0)."""
        return self._states is not None

    def states(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(n_subwords, d) float32 input of the top layers and (n_kept,) first-sub-word positions."""
        if self._states is None:
            raise TableError(f"{self.dir}: no {STATES_FILE} (the text stage ran with text.tune_top: 0)")
        r = self._states.row(sample_id)
        return self._states.array("states", r), self._states.array("first", r)

    @property
    def table(self) -> FeatureTable:
        """The underlying words table (for inspection)."""
        return self._words

    @property
    def prompt_table(self) -> FeatureTable:
        return self._types


# ---- caption features (retrieval / EGR) ----------------------------------------------------------

CAPTIONS_FILE = "captions.parquet"


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
    d = Path(dir)
    arrays = {"emb": emb, "prompt_emb": prompt_emb, "mask_emb": mask_emb}
    write_feature_table(d / CAPTIONS_FILE,
                        {"caption_id": pa.array(ids, pa.string()), "n_entities": pa.array(n_entities, pa.int32())},
                        arrays, provenance)
    return d


class CaptionFeatures:
    """Caption, entity-prompt and masked-caption embeddings, from the ``captions`` stage."""

    def __init__(self, dir: str | os.PathLike) -> None:
        d = Path(dir)
        stage = _stage_for(d, "captions")
        if not d.is_dir():
            raise TableError(f"{d}: caption feature dir not found{_stage_hint(d, stage)}")
        self.dir = d
        t = _require_digests(FeatureTable(d / CAPTIONS_FILE, key="caption_id", stage=stage), stage)
        self._table = t
        self.provenance: dict = t.provenance
        self.caption_ids: list[str] = t.keys
        self.emb: np.ndarray = t.stack("emb")  # (N, D) float32
        self.prompt_emb: np.ndarray = t.stack("prompt_emb")  # (N, S, D)
        self.mask_emb: np.ndarray = t.stack("mask_emb")  # (N, S, D)
        self.n_entities: np.ndarray = np.asarray(t.columns["n_entities"], dtype=np.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.caption_ids)

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
