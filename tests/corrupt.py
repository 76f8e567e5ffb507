"""Damage a cache file the way a bad disk or a stray write does: same size, different bytes."""
from __future__ import annotations

from pathlib import Path

import h5py

FLOAT_MAX = b"\xff\xff\x7f\x7f" * 64  # 256 bytes = 64 float32 3.4e38: finite, so no NaN check sees them


def overwrite_middle(path: Path, dataset: str, data: bytes = FLOAT_MAX) -> None:
    """Overwrite ``data`` in the middle of ``dataset``'s stored bytes (its middle chunk), keeping the file size."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks is None:
            offset, size = ds.id.get_offset(), ds.id.get_storage_size()
        else:
            info = ds.id.get_chunk_info(ds.id.get_num_chunks() // 2)
            offset, size = info.byte_offset, info.size
    assert size > len(data), f"{path}: {dataset!r} stores {size} bytes there, fewer than {len(data)}"
    size_before = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(offset + (size - len(data)) // 2)
        fh.write(data)
    assert path.stat().st_size == size_before


def overwrite_parquet_column(path: Path, column: str, row_group: int = 0, data: bytes = FLOAT_MAX) -> None:
    """Overwrite ``data`` in the middle of ``column``'s stored bytes in one row group, keeping the file size."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = next(meta.column(i) for i in range(meta.num_columns)
                 if meta.column(i).path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    assert chunk.total_compressed_size > len(data), f"{path}: {column!r} stores fewer than {len(data)} bytes there"
    size_before = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(start + (chunk.total_compressed_size - len(data)) // 2)
        fh.write(data)
    assert path.stat().st_size == size_before
