"""A flat copy of some rows of a feature table, for shuffled reads at page-cache speed.

A Parquet row group is decoded whole (about ``ROW_GROUP_BYTES``) to read one of its rows. In
file order that happens once per row group; in shuffled order (a training epoch over a split
larger than the item cache) nearly once per row: on WNUT-17 train (536 MiB of items) an epoch
spent 24-27 s reading, about a third of its time. :class:`FlatRows` copies the rows wanted
once, in file order, decoding only the row groups that hold them, into uncompressed files in
a scratch directory (one per array column, in the stored precision: a float16 cache stays
half size), and then serves a row with one ``os.pread``. The
bytes sit in the operating system's page cache, not in the process, so memory stays flat;
the values are exactly those the table returns (verified against its digests as they are
copied). The directory is removed by :meth:`FlatRows.close`, when the object is collected,
or at exit.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCRATCH_PREFIX = "pipeline-flat-"  # then the owner's pid: pipeline-flat-<pid>-<random>


class FlatCopyError(RuntimeError):
    """The flat copy cannot be written (no space, no permission): names the directory and the size."""


def remove_stale_copies(parent: Path) -> int:
    """Delete the copies under ``parent`` whose process is gone (a SIGKILL leaves them); how many."""
    import shutil

    n = 0
    for d in parent.glob(f"{SCRATCH_PREFIX}*-*") if parent.is_dir() else []:
        pid = d.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        except PermissionError:  # alive, someone else's
            pass
    return n


class FlatRows:
    """Rows ``rows`` of the array columns ``names`` of a :class:`~pipeline.stores.tables.FeatureTable`.

    ``array(name, row)`` takes a row number of the table (one of ``rows``). ``scratch``: the
    parent of the temporary directory (default ``$TMPDIR``); it needs the rows' size at the
    table's stored precision. Copies that killed processes left there are removed first.
    """

    def __init__(self, table: Any, rows: Sequence[int] | np.ndarray, names: Sequence[str],
                 scratch: str | os.PathLike | None = None) -> None:
        self.path = table.path
        self.rows = np.unique(np.asarray(rows, dtype=np.int64))  # (R,) sorted table rows
        parent = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
        remove_stale_copies(parent)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent))
        self._fds: dict[str, int] = {}
        self._finalizer = weakref.finalize(self, _remove, self.dir, self._fds)
        self._offsets: dict[str, np.ndarray] = {}  # (R + 1,) byte offsets in the column's file
        self._shapes: dict[str, np.ndarray] = {}   # (R, ndim)
        self._dtypes: dict[str, tuple[np.dtype, np.dtype]] = {}  # (stored, returned)
        try:
            groups = table.groups_of(self.rows)
            for name in names:
                self._copy(table, name, groups)
        except OSError as e:
            need = sum(int(np.prod(table.shapes(n)[self.rows], axis=1).sum()) * table.stored_dtype(n).itemsize
                       for n in names)
            self.close()
            raise FlatCopyError(f"{self.dir}: cannot write the flat copy of {self.path} ({need / 2**20:.0f} MiB): "
                                f"{e.strerror or e}; free space there or set TMPDIR to a disk with room") from e
        except BaseException:
            self.close()
            raise

    def _copy(self, table: Any, name: str, groups: np.ndarray) -> None:
        offsets = np.zeros(self.rows.size + 1, dtype=np.int64)
        shapes: np.ndarray | None = None
        stored, out = table.stored_dtype(name), table.value_dtype(name)  # e.g. float16 kept, float32 returned
        file = self.dir / f"{name}.bin"
        with open(file, "wb") as f:
            for start, values, offs, shp in table.iter_groups(name, groups):
                lo, hi = np.searchsorted(self.rows, [start, start + len(shp)])
                if shapes is None:
                    shapes = np.zeros((self.rows.size, shp.shape[1]), dtype=np.int64)
                values = values.astype(stored, copy=False)  # back to the stored precision: exact
                for j in range(int(lo), int(hi)):
                    r = int(self.rows[j]) - start
                    piece = values[offs[r]:offs[r + 1]]
                    f.write(memoryview(np.ascontiguousarray(piece)).cast("B"))
                    offsets[j + 1] = offsets[j] + piece.nbytes
                    shapes[j] = shp[r]
        self._offsets[name] = offsets
        self._shapes[name] = shapes if shapes is not None else np.zeros((0, 1), np.int64)
        self._dtypes[name] = (np.dtype(stored), np.dtype(out))
        self._fds[name] = os.open(file, os.O_RDONLY)

    @property
    def nbytes(self) -> int:
        """Bytes of the copied values on disk."""
        return int(sum(int(o[-1]) for o in self._offsets.values()))

    def array(self, name: str, row: int) -> np.ndarray:
        """Row ``row`` (a table row number) of column ``name``, with its shape (a writable copy)."""
        j = int(np.searchsorted(self.rows, row))
        if j >= self.rows.size or self.rows[j] != row:
            raise KeyError(f"{self.path}: row {row} is not in this flat copy ({self.rows.size} rows)")
        a, b = int(self._offsets[name][j]), int(self._offsets[name][j + 1])
        buf = bytearray(b - a)
        if b > a and os.preadv(self._fds[name], [buf], a) != b - a:
            raise OSError(f"{self.dir / (name + '.bin')}: short read of row {row}")
        stored, out = self._dtypes[name]
        a = np.frombuffer(buf, dtype=stored).reshape(tuple(self._shapes[name][j]))
        return a if stored == out else a.astype(out)

    def close(self) -> None:
        """Close the files and remove the scratch directory."""
        self._finalizer()


class FlatText:
    """Some samples of a :class:`~pipeline.stores.tables.TextFeatures`, copied flat (:class:`FlatRows`).

    ``get(sample_id)`` and ``states(sample_id)`` return what the text cache returns; the rest
    (``type_prompts``, ``n_words``, ...) is the cache's own. ``close()`` removes the copy.
    """

    def __init__(self, text: Any, sample_ids: Sequence[str], states: bool = False,
                 scratch: str | os.PathLike | None = None) -> None:
        self.text = text
        rows = np.fromiter((text.table.row(s) for s in sample_ids), dtype=np.int64, count=len(sample_ids))
        self._words = FlatRows(text.table, rows, ["feats"], scratch)
        self._states = (FlatRows(text.states_table, rows, ["states", "first"], scratch)
                        if states and text.states_table is not None else None)

    def __getattr__(self, name: str) -> Any:  # everything but the rows: the cache's own
        if name.startswith("_") or name == "text":
            raise AttributeError(name)
        return getattr(self.text, name)

    @property
    def nbytes(self) -> int:
        return self._words.nbytes + (self._states.nbytes if self._states is not None else 0)

    def get(self, sample_id: str) -> np.ndarray:
        """(n_kept_words, n_layers, d) float32."""
        return self._words.array("feats", self.text.table.row(sample_id))

    def states(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(n_subwords, d) float32 and (n_kept,) first-sub-word positions."""
        if self._states is None:
            return self.text.states(sample_id)
        r = self.text.table.row(sample_id)
        return self._states.array("states", r), self._states.array("first", r)

    def close(self) -> None:
        self._words.close()
        if self._states is not None:
            self._states.close()


def _remove(directory: Path, fds: dict[str, int]) -> None:
    import shutil

    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    shutil.rmtree(directory, ignore_errors=True)
