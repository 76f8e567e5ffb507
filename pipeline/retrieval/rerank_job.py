"""The `rerank` stage: plain, EGR, TBR and EGR+TBR lists, written as AGREE prediction files.

Output dir (predictions/<ds>/retrieval/): for each method in plain, egr, tbr, egr_tbr
``texts_<method>.jsonl`` (text to image: ``{"query_id", "item_ids"}``) and
``images_<method>.jsonl`` (image to text: ``{"image_id", "item_ids"}``), ids in their
original JSON types (one type per kind of id in both files, see
:func:`~pipeline.retrieval.agree_io.prediction_id_types`), lists cut to ``rerank.top_k``;
``provenance.json`` (no timings).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import write_json
from pipeline.retrieval.agree_io import prediction_id_types, write_predictions
from pipeline.retrieval.data import RetrievalSet
from pipeline.retrieval.rerank import METHODS, EgrWeights, rerank_all
from pipeline.retrieval.retrieve_job import read_pool

FILES = {"t2i": "texts_{}.jsonl", "i2t": "images_{}.jsonl"}


def prediction_path(out_dir: str | os.PathLike, direction: str, method: str) -> Path:
    """``<out>/texts_<method>.jsonl`` (t2i) or ``<out>/images_<method>.jsonl`` (i2t)."""
    return Path(out_dir) / FILES[direction].format(method)


def run_rerank(rs: RetrievalSet, pool_dir: str | os.PathLike, params: Mapping[str, Any],
               id_types: Mapping[str, str], out_dir: str | os.PathLike,
               provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Re-rank the retrieved pools of ``rs`` and write the eight AGREE prediction files.

    ``id_types`` as :func:`~pipeline.retrieval.agree_io.load_id_types` gives them.
    """
    pool_dir = Path(pool_dir)
    t0 = time.perf_counter()
    t2i_c, t2i_s, prov_t = read_pool(pool_dir / "t2i.parquet", rs.caption_ids, rs.image_ids,
                                     "data/prepared captions.parquet", rs.info.get("image_file", "images"))
    i2t_c, i2t_s, prov_i = read_pool(pool_dir / "i2t.parquet", rs.image_ids, rs.caption_ids,
                                     "data/prepared gallery.parquet", rs.info.get("caption_file", "captions"))
    for prov, f in ((prov_t, "t2i.parquet"), (prov_i, "i2t.parquet")):
        if prov.get("embeddings_fingerprint") != rs.fingerprint():
            raise ValueError(f"{pool_dir / f}: made from other embeddings than the current "
                             f"{rs.info.get('source')} caches; rerun `dvc repro` (retrieve is stale)")
    load_s = time.perf_counter() - t0

    top_k, pool = int(params["top_k"]), int(params["pool"])
    egr = params["egr"]
    for name, c, n_gallery in (("t2i", t2i_c, len(rs.image_ids)), ("i2t", i2t_c, len(rs.caption_ids))):
        if c.shape[1] < min(pool, n_gallery):
            raise ValueError(f"params.yaml: rerank.pool is {pool}, but {pool_dir / (name + '.parquet')} keeps only "
                             f"{c.shape[1]} candidates per query (retrieval.pool); lower rerank.pool or raise retrieval.pool")
    timings: dict[str, float] = {}
    lists = rerank_all(t2i_c, t2i_s, i2t_c, i2t_s, rs.image_emb, rs.mask_emb, rs.prompt_emb, rs.n_entities,
                       top_k=top_k, pool=pool, pad=str(egr["pad"]), weights=EgrWeights.from_params(egr),
                       absent_rank=int(params["tbr"]["absent_rank"]), timings=timings)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sides = {"t2i": (rs.caption_ids, rs.image_ids), "i2t": (rs.image_ids, rs.caption_ids)}
    types = prediction_id_types(id_types)
    changed: dict[str, Any] = {}
    for method in METHODS:
        for d in ("t2i", "i2t"):
            qids, items = sides[d]
            arr = lists[method][d]
            write_predictions(prediction_path(out, d, method), d,
                              ((q, [items[i] for i in row if i >= 0]) for q, row in zip(qids, arr.tolist())),
                              types[f"{d}_query"], types[f"{d}_item"])
            if method != "plain":  # how many lists the method reordered or changed
                changed[f"{d}_{method}"] = int((arr != lists["plain"][d]).any(1).sum())
    write_json(out / "provenance.json", {**dict(provenance), "pool_provenance": {"t2i": prov_t, "i2t": prov_i},
                                         "lists_changed_vs_plain": changed, "top_k": top_k, "pool": pool,
                                         "prediction_id_types": types})
    return {"load_s": round(load_s, 4), "egr_s": round(timings["egr_s"], 4), "tbr_s": round(timings["tbr_s"], 4),
            "write_s": round(time.perf_counter() - t0, 4), "lists_changed_vs_plain": changed,
            "captions": len(rs.caption_ids), "images": len(rs.image_ids),
            "entities": {"captions_with_none": int((rs.n_entities == 0).sum()),
                         "mean": float(np.mean(rs.n_entities)) if len(rs.n_entities) else 0.0,
                         "over_slots": int((rs.n_entities > rs.mask_emb.shape[1]).sum())}}
