"""The `retrieve` stage: top-``pool`` candidates with cosine scores, both directions.

Output dir (features/<ds>/retrieval/): ``t2i.parquet`` (a row per test caption: its
candidate images) and ``i2t.parquet`` (a row per test image: its candidate captions), columns
``query_id`` (str), ``item_ids`` (list<str>, best first) and ``scores`` (list<float32>),
with provenance in the schema metadata (index, params, embedding source and fingerprint,
recall against exact search for an approximate index). No timings there (same inputs, same
bytes); they go to the report JSON.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.artifacts import read_parquet_provenance, write_parquet
from pipeline.retrieval.data import RetrievalSet
from pipeline.retrieval.index import VectorIndex, exact_search, is_memory_mapped, recall_vs_exact

DIRECTIONS = ("t2i", "i2t")


def write_pool(path: str | os.PathLike, query_ids: list[str], item_ids: list[str], cand: np.ndarray,
               scores: np.ndarray, provenance: Mapping[str, Any]) -> Path:
    """Write candidate lists; ``cand`` (Q, K) rows into ``item_ids`` (-1: empty slot, dropped)."""
    items = np.asarray(item_ids, dtype=object)
    ids_col, sc_col = [], []
    for row, sc in zip(cand, scores):
        ok = row >= 0
        ids_col.append(items[row[ok]].tolist())
        sc_col.append(sc[ok].astype(np.float32))
    table = pa.table({
        "query_id": pa.array(query_ids, pa.string()),
        "item_ids": pa.array(ids_col, pa.list_(pa.string())),
        "scores": pa.array([s.tolist() for s in sc_col], pa.list_(pa.float32())),
    })
    return write_parquet(table, path, dict(provenance))


POOL_BLOCK = 4096  # pool rows read at a time
# read the parquet pages as the batches need them: by default pyarrow reads a whole row group (a
# whole pool file, as write_parquet writes it: 0.6 GB at 400k x 128) before the first batch
POOL_READ = {"pre_buffer": False, "buffer_size": 1 << 20}


def _unreadable(p: Path, e: Exception) -> ValueError:
    return ValueError(f"{p}: cannot read this pool file ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                      f"rerun `dvc repro` (the retrieve stage writes it)")


def open_pool(path: str | os.PathLike, query_ids: list[str], query_file: str) -> tuple[np.ndarray, dict]:
    """(rows (Q,): the row of ``query_ids`` that each row of the pool file holds, provenance).

    Reads only the ``query_id`` column; ids of the pool file that ``query_ids`` lack (or the
    reverse) are an error naming the pool file and ``query_file``.
    """
    import pyarrow.parquet as pq

    from pipeline.retrieval.data import IdMismatchError, match_ids

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found; it is written by the `retrieve` stage")
    try:
        qids = [str(x) for x in pq.read_table(p, columns=["query_id"]).column("query_id").to_pylist()]
    except Exception as e:  # not Parquet, truncated, no query_id column
        raise _unreadable(p, e) from e
    if qids == query_ids:  # the order retrieve writes: no id -> row map (Q entries) needed
        return np.arange(len(qids), dtype=np.int64), read_parquet_provenance(p)
    rows = match_ids(query_ids, qids, query_file, p, "query")  # file row of each wanted query
    if len(qids) != len(query_ids):
        extra = sorted(set(qids) - set(query_ids))[:5]
        twice = sorted(q for q, c in Counter(qids).items() if c > 1)[:5]
        what = f"listed more than once: {twice}" if twice else f"e.g. extra {extra}"
        raise IdMismatchError(f"{p} has {len(qids)} queries, {query_file} {len(query_ids)} ({what})")
    out_rows = np.empty(len(rows), np.int64)
    out_rows[rows] = np.arange(len(rows))
    return out_rows, read_parquet_provenance(p)


def iter_pool(path: str | os.PathLike, out_rows: np.ndarray, query_ids: list[str], item_pos: Mapping[str, int],
              item_file: str, block: int = POOL_BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(rows (B,), cand (B, K), scores (B, K))`` per block of a pool file's rows, in file order.

    ``out_rows`` from :func:`open_pool`; rows index ``query_ids``; cand holds rows of the items
    (``item_pos``: id -> row) with -1 padding, scores float32 with -inf padding, K the block's
    longest list. Only a block of the file is in memory at a time. An item id missing from
    ``item_pos`` is an error naming the query and ``item_file``.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.retrieval.data import IdMismatchError

    p = Path(path)
    start = 0
    try:
        batches = pq.ParquetFile(p, **POOL_READ).iter_batches(batch_size=block, columns=["item_ids", "scores"],
                                                              use_threads=False)
    except Exception as e:
        raise _unreadable(p, e) from e
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged page
            raise _unreadable(p, e) from e
        if batch is None:
            return
        lists = batch.column("item_ids")
        n = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
        n_sc = pc.list_value_length(batch.column("scores")).fill_null(0).to_numpy(zero_copy_only=False)
        if np.any(n_sc != n):
            r = int(np.flatnonzero(n_sc != n)[0])
            raise ValueError(f"{p}: query {query_ids[out_rows[start + r]]!r} has {n[r]} items but {n_sc[r]} scores: "
                             f"the pool file is damaged; rerun `dvc repro` (retrieve writes it)")
        flat = lists.flatten().to_pylist()
        idx = list(map(item_pos.get, flat))  # None: an id the items lack
        if None in idx:
            r = int(np.searchsorted(np.cumsum(n), idx.index(None), side="right"))
            items = flat[int(n[:r].sum()):int(n[:r + 1].sum())]
            bad = [i for i in items if i not in item_pos]
            raise IdMismatchError(f"{p}: query {query_ids[out_rows[start + r]]!r} lists ids missing from {item_file} "
                                  f"(e.g. {bad[:5]}); the embeddings changed since `retrieve` ran: rerun it")
        B = len(n)
        cand = np.full((B, int(n.max(initial=0))), -1, np.int64)
        sc = np.full(cand.shape, -np.inf, np.float32)
        row = np.repeat(np.arange(B), n)
        col = np.arange(row.size) - np.repeat(np.cumsum(n) - n, n)  # position within its list
        cand[row, col] = idx
        sc[row, col] = batch.column("scores").flatten().to_numpy(zero_copy_only=False)
        yield out_rows[start:start + B], cand, sc
        start += B


def read_pool(path: str | os.PathLike, query_ids: list[str], item_ids: list[str],
              query_file: str, item_file: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(cand (Q, K) int64 rows into ``item_ids`` with -1 padding, scores (Q, K) float32, provenance).

    Rows follow ``query_ids``; ids of the pool file that these lists lack are an error
    naming the pool file and the file the lists come from. The whole pool in memory: the
    ``rerank`` stage reads it a block at a time (:func:`open_pool`, :func:`iter_pool`).
    """
    out_rows, prov = open_pool(path, query_ids, query_file)
    pos = {k: i for i, k in enumerate(item_ids)}
    blocks = list(iter_pool(path, out_rows, query_ids, pos, item_file))
    K = max((c.shape[1] for _, c, _ in blocks), default=0)
    cand = np.full((len(query_ids), K), -1, np.int64)
    sc = np.full((len(query_ids), K), -np.inf, np.float32)
    for rows, c, s in blocks:
        cand[rows, :c.shape[1]], sc[rows, :s.shape[1]] = c, s
    return cand, sc, prov


def _index(gallery: np.ndarray, params: Mapping[str, Any]) -> VectorIndex:
    kind = str(params["index"])
    pq = ({"pq_m": int(params["pq_m"]), "pq_bits": int(params["pq_bits"]), "pq_rescore": int(params["pq_rescore"])}
          if kind == "ivfpq" else {})
    return VectorIndex(gallery, kind, nlist=int(params["nlist"]), nprobe=int(params["nprobe"]),
                       hnsw_m=int(params["hnsw_m"]), ef_search=int(params["ef_search"]),
                       ef_construction=int(params["ef_construction"]), threads=int(params["threads"]),
                       normalize=False, **pq)  # RetrievalSet rows are unit already


def recall_line(info: Mapping[str, Any]) -> str:
    """``, recall vs exact @10 0.9876 @128 0.9512 (1000 queries)`` for the stage's printed line, from
    an index info with ``recall_vs_exact`` (recall@10 beside recall@pool); '' without one."""
    r = info.get("recall_vs_exact")
    if not r:
        return ""
    ats = sorted((int(k[3:]), v) for k, v in r.items() if k.startswith("at_"))
    return ", recall vs exact " + " ".join(f"@{k} {v:.4f}" for k, v in ats) + f" ({r['queries']} queries)"


def gallery_scratch(params: Mapping[str, Any], parent: str | os.PathLike | None = None):
    """The ``scratch`` to load the retrieval set with: a temporary directory (removed on exit, also on
    an error) for ``index: ivfpq``, whose gallery is then memory-mapped from float32 ``.npy``
    files there rather than held in RAM; ``None`` (everything in memory) for the other kinds,
    which copy the whole gallery into their index anyway."""
    from contextlib import nullcontext

    from pipeline.retrieval.data import scratch_dir

    return scratch_dir(parent) if str(params["index"]) == "ivfpq" else nullcontext(None)


def run_retrieve(rs: RetrievalSet, params: Mapping[str, Any], out_dir: str | os.PathLike,
                 provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Search both directions and write ``t2i.parquet`` / ``i2t.parquet``; returns the report.

    The embeddings may be memory-mapped (``load_retrieval_set(..., scratch=...)``): queries are
    searched ``batch_size`` at a time and an ``ivfpq`` index reads the gallery rows in chunks
    and its re-scored candidates from the file, so neither side is read into memory whole.
    """
    pool = int(params["pool"])
    if pool < 1:
        raise ValueError(f"params.yaml: retrieval.pool must be >= 1, got {pool}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"pool": pool, "directions": {}}
    sides = {"t2i": (rs.caption_emb, rs.caption_ids, rs.image_emb, rs.image_ids),
             "i2t": (rs.image_emb, rs.image_ids, rs.caption_emb, rs.caption_ids)}
    for d in DIRECTIONS:
        q, qids, g, gids = sides[d]
        report["directions"][d] = retrieve_direction(d, q, qids, g, gids, params, out, provenance)
    return report


def retrieve_direction(d: str, q: np.ndarray, qids: list[str], g: np.ndarray, gids: list[str],
                       params: Mapping[str, Any], out: Path, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """One direction: index ``g`` (unit rows, in memory or memory-mapped), search ``q``, check recall,
    write ``out/<d>.parquet``; returns its report entry."""
    pool = int(params["pool"])
    bs = int(params["batch_size"])
    check = int(params.get("recall_check", 1000))
    t0 = time.perf_counter()
    index = _index(g, params)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, cand = index.search(q, pool, bs, progress=f"retrieve {d}")
    search_s = time.perf_counter() - t0
    info = {k: v for k, v in index.info.items() if k not in ("build_seconds", "threads")}
    want = min(pool, len(gids))
    found = (cand >= 0).sum(axis=1)  # (Q,) an approximate index may return fewer than asked
    if want and (found == 0).any():
        empty = np.flatnonzero(found == 0)
        zero = [qids[int(r)] for r in empty if not np.any(q[int(r)])]
        if zero:  # a zero vector has no nearest list: no nprobe helps
            raise ValueError(f"retrieve {d}: {len(zero)} quer{'y is' if len(zero) == 1 else 'ies are'} an all-zero "
                             f"embedding (e.g. {zero[0]!r}: an image or caption whose features fell back to zeros, "
                             f"images.fallback: zero) and the {index.kind} index finds nothing for it; set "
                             f"images.fallback: blank or retrieval.index: flat")
        knob = {"ivf": "raise retrieval.nprobe", "hnsw": "raise retrieval.ef_search",
                "ivfpq": "raise retrieval.nprobe"}.get(index.kind, "use flat")
        raise ValueError(f"retrieve {d}: {int((found == 0).sum())} of {len(qids)} queries got no candidate "
                         f"from the {index.kind} index (e.g. {qids[int(np.flatnonzero(found == 0)[0])]!r}); "
                         f"{knob} or set retrieval.index: flat")
    if "fallback" in info:
        print(f"retrieve {d}: ivfpq index not built, searched exactly instead ({info['fallback']}); "
              "recorded in the provenance", file=sys.stderr)
    info["short_lists"] = int((found < want).sum())  # queries with fewer than min(pool, gallery) candidates
    if info["short_lists"]:
        print(f"retrieve {d}: {info['short_lists']} of {len(qids)} queries got fewer than {want} candidates "
              f"from the {index.kind} index (kept as they are; counted in the report)", file=sys.stderr)
    if index.kind != "flat" and check > 0:
        n = min(check, q.shape[0])
        _, ex = exact_search(g, q[:n], pool, bs, threads=int(params["threads"]))
        info["recall_vs_exact"] = {"queries": n, "at_10": recall_vs_exact(cand[:n], ex, 10),
                                   f"at_{pool}": recall_vs_exact(cand[:n], ex, pool)}
    prov = {**dict(provenance), "direction": d, "queries": len(qids), "gallery": len(gids),
            "pool": int(cand.shape[1]), "index": info}
    write_pool(out / f"{d}.parquet", qids, gids, cand, scores, prov)
    return {**info, "queries": len(qids), "gallery": len(gids), "memory_mapped": is_memory_mapped(g),
            "build_s": round(build_s, 4), "search_s": round(search_s, 4),
            "queries_per_s": round(len(qids) / search_s, 1) if search_s > 0 else None}
