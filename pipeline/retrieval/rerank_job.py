"""The `rerank` stage: plain, EGR, TBR and EGR+TBR lists, written as AGREE prediction files.

Output dir (predictions/<ds>/retrieval/): for each method in plain, egr, tbr, egr_tbr
``texts_<method>.jsonl`` (text to image: ``{"query_id", "item_ids"}``) and
``images_<method>.jsonl`` (image to text: ``{"image_id", "item_ids"}``), ids in their
original JSON types (one type per kind of id in both files, see
:func:`~pipeline.retrieval.agree_io.prediction_id_types`), lists cut to ``rerank.top_k``;
``provenance.json`` (no timings).

The job goes a block of queries at a time, so its memory does not grow with the gallery or the
captions (beyond their ids): the pools are read from their parquet files a block at a time, EGR
reads only the block's rows of the embeddings (memory-mapped when the set was loaded with
``scratch``), the plain and EGR lists of both directions, which TBR needs whole as back lists,
are kept as memory-mapped ``.npy`` files in ``scratch`` (in memory without it), and the
prediction files are written a block at a time. The lists are those of
:func:`~pipeline.retrieval.rerank.rerank_all` on the whole arrays (every row depends on its
own pool and the back lists only), so the files are the same bytes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic_path, write_json
from pipeline.retrieval.agree_io import prediction_id_types, write_predictions
from pipeline.retrieval.data import RetrievalSet
from pipeline.retrieval.index import release_pages
from pipeline.retrieval.rerank import (
    METHODS,
    EgrWeights,
    check_sizes,
    egr_lists,
    plain_lists,
    slot_mask,
    tbr_rerank,
)
from pipeline.retrieval.retrieve_job import DIRECTIONS, iter_pool, open_pool

FILES = {"t2i": "texts_{}.jsonl", "i2t": "images_{}.jsonl"}
BLOCK = 1024  # queries re-ranked (and pool rows read) at a time


def prediction_path(out_dir: str | os.PathLike, direction: str, method: str) -> Path:
    """``<out>/texts_<method>.jsonl`` (t2i) or ``<out>/images_<method>.jsonl`` (i2t)."""
    return Path(out_dir) / FILES[direction].format(method)


def run_rerank(rs: RetrievalSet, pool_dir: str | os.PathLike, params: Mapping[str, Any],
               id_types: Mapping[str, str], out_dir: str | os.PathLike, provenance: Mapping[str, Any],
               scratch: str | os.PathLike | None = None, block: int = BLOCK) -> dict[str, Any]:
    """Re-rank the retrieved pools of ``rs`` and write the eight AGREE prediction files.

    ``id_types`` as :func:`~pipeline.retrieval.agree_io.load_id_types` gives them. ``scratch``:
    an existing directory (the caller removes it) for the plain and EGR lists, (Q, top_k) per
    direction, as memory-mapped files; ``None`` keeps them in memory. ``block``: queries at a time.
    """
    pool_dir = Path(pool_dir)
    top_k, pool = int(params["top_k"]), int(params["pool"])
    check_sizes(top_k, pool)
    egr = params["egr"]
    weights, absent = EgrWeights.from_params(egr), int(params["tbr"]["absent_rank"])
    sides = {  # queries, items, the file the queries come from, the file the items come from
        "t2i": (rs.caption_ids, rs.image_ids, "data/prepared captions.parquet", rs.info.get("image_file", "images")),
        "i2t": (rs.image_ids, rs.caption_ids, "data/prepared gallery.parquet", rs.info.get("caption_file", "captions"))}
    t0 = time.perf_counter()
    opened = {d: open_pool(pool_dir / f"{d}.parquet", sides[d][0], sides[d][2]) for d in DIRECTIONS}
    fingerprint = rs.fingerprint()
    for d, (_, prov) in opened.items():
        if prov.get("embeddings_fingerprint") != fingerprint:
            raise ValueError(f"{pool_dir / (d + '.parquet')}: made from other embeddings than the current "
                             f"{rs.info.get('source')} caches; rerun `dvc repro` (retrieve is stale)")
        if "pool" in prov:  # the width retrieve wrote: fail before reading the pools when it is too narrow
            _check_width(d, int(prov["pool"]), pool, len(sides[d][1]), pool_dir)
    timings = {"load_s": time.perf_counter() - t0, "egr_s": 0.0, "tbr_s": 0.0}

    # the plain and EGR lists of both directions, a block of pool rows at a time
    counted = slot_mask(rs.n_entities, rs.mask_emb.shape[1], str(egr["pad"]))  # (Nc, S)
    lists: dict[str, dict[str, np.ndarray]] = {"plain": {}, "egr": {}}
    for d in DIRECTIONS:
        qids, items, _, item_file = sides[d]
        dtype = np.int32 if len(items) < 2 ** 31 else np.int64
        for m in lists:
            lists[m][d] = _list_array(scratch, f"{m}_{d}.npy", (len(qids), top_k), dtype)
        pos = {k: i for i, k in enumerate(items)}
        longest = 0
        t0 = time.perf_counter()
        for rows, cand, s in iter_pool(pool_dir / f"{d}.parquet", opened[d][0], qids, pos, item_file, block):
            longest = max(longest, cand.shape[1])
            cand, s = _fit(cand, s, pool)  # (B, pool)
            t1 = time.perf_counter()
            timings["load_s"] += t1 - t0
            if d == "t2i":  # the block's query captions, any image of the gallery
                emb = (rs.image_emb, rs.mask_emb[rows], rs.prompt_emb[rows], counted[rows])
            else:  # the block's query images, any caption
                emb = (rs.image_emb[rows], rs.mask_emb, rs.prompt_emb, counted)
            lists["plain"][d][rows] = plain_lists(cand, s, top_k)
            lists["egr"][d][rows] = egr_lists(d, emb[0], cand, s, *emb[1:], top_k, weights, block)
            for a in (rs.image_emb, rs.mask_emb, rs.prompt_emb, lists["plain"][d], lists["egr"][d]):
                release_pages(a)
            t0 = time.perf_counter()
            timings["egr_s"] += t0 - t1
        timings["load_s"] += time.perf_counter() - t0
        if len(qids):  # a direction without queries has no lists, so no width to check
            _check_width(d, longest, pool, len(items), pool_dir)
        del pos

    t0 = time.perf_counter()
    # the whole dir is written under a temp name and swapped in: an error half way leaves the
    # previous predictions, not a mix of old and new files that looks complete
    with atomic_path(Path(out_dir)) as out:
        out.mkdir(parents=True)
        types = prediction_id_types(id_types)
        changed: dict[str, Any] = {}
        for method in METHODS:
            for d in DIRECTIONS:
                qids, items = sides[d][:2]
                if method != "plain":  # how many lists the method reordered or changed
                    changed[f"{d}_{method}"] = 0

                def lines(method: str = method, d: str = d) -> Iterator[tuple[str, list[str]]]:
                    for a, arr in _method_blocks(method, d, lists, absent, block, timings):
                        if method != "plain":
                            plain = lists["plain"][d][a:a + len(arr)]
                            changed[f"{d}_{method}"] += int((arr != plain).any(1).sum())
                        yield from ((q, [items[i] for i in row if i >= 0]) for q, row in zip(qids[a:a + len(arr)],
                                                                                             arr.tolist()))

                write_predictions(prediction_path(out, d, method), d, lines(), types[f"{d}_query"], types[f"{d}_item"])
        write_json(out / "provenance.json", {**dict(provenance),
                                             "pool_provenance": {d: opened[d][1] for d in DIRECTIONS},
                                             "lists_changed_vs_plain": changed, "top_k": top_k, "pool": pool,
                                             "prediction_id_types": types})
    write_s = time.perf_counter() - t0 - timings["tbr_s"]
    return {"load_s": round(timings["load_s"], 4), "egr_s": round(timings["egr_s"], 4),
            "tbr_s": round(timings["tbr_s"], 4), "write_s": round(write_s, 4), "lists_changed_vs_plain": changed,
            "captions": len(rs.caption_ids), "images": len(rs.image_ids),
            "entities": {"captions_with_none": int((rs.n_entities == 0).sum()),
                         "mean": float(np.mean(rs.n_entities)) if len(rs.n_entities) else 0.0,
                         "over_slots": int((rs.n_entities > rs.mask_emb.shape[1]).sum())}}


def _check_width(d: str, width: int, pool: int, n_gallery: int, pool_dir: Path) -> None:
    if width < min(pool, n_gallery):
        raise ValueError(f"params.yaml: rerank.pool is {pool}, but {pool_dir / (d + '.parquet')} keeps only "
                         f"{width} candidates per query (retrieval.pool); lower rerank.pool or raise retrieval.pool")


def _fit(cand: np.ndarray, s: np.ndarray, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``pool`` columns of cand, s (B, K), padded with -1 / -inf to (B, pool): trailing
    empty slots change no list (they sort last and are dropped), so every block has one width."""
    if cand.shape[1] >= pool:
        return cand[:, :pool], s[:, :pool]
    pad = pool - cand.shape[1]
    return (np.pad(cand, ((0, 0), (0, pad)), constant_values=-1),
            np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf))


def _list_array(scratch: str | os.PathLike | None, name: str, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """A (Q, top_k) list array: a writeable memory-mapped ``.npy`` in ``scratch``, or in memory without it.

    Never flushed: this process reads it back through the same shared mapping (dropping its pages
    with ``release_pages`` keeps the writes, in the page cache), and the caller deletes the file.
    """
    if scratch is None:
        return np.empty(shape, dtype)
    return np.lib.format.open_memmap(Path(scratch) / name, mode="w+", dtype=dtype, shape=shape)


def _method_blocks(method: str, d: str, lists: Mapping[str, Mapping[str, np.ndarray]], absent: int, block: int,
                   timings: dict[str, float]) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, (B, top_k) lists)`` of ``method`` in direction ``d``, in query order; TBR
    re-ranks the plain (EGR+TBR: the EGR) lists with the other direction's as back lists."""
    src = lists["egr" if method.startswith("egr") else "plain"]
    fwd, back = src[d], src["i2t" if d == "t2i" else "t2i"]
    for a in range(0, fwd.shape[0], block):
        arr = np.asarray(fwd[a:a + block])
        if method in ("tbr", "egr_tbr"):
            t0 = time.perf_counter()
            arr, _ = tbr_rerank(arr, back, absent, first_row=a, n_queries=fwd.shape[0])
            timings["tbr_s"] += time.perf_counter() - t0
        for x in (fwd, back, lists["plain"][d]):
            release_pages(x)
        yield a, arr
