"""The rerank stage's block-wise, memory-mapped path gives the files of the whole-array path.

Reference ("today's path"): the retrieval set loaded into memory, both pools read whole
(``read_pool``), :func:`rerank_all` on the whole arrays, the lists written with
``write_predictions``. Under test: ``run_rerank`` on the memory-mapped set, the pools read a
few rows at a time (in another row order than the set's, some lists shorter than the pool),
blocks of 7 queries, the plain / EGR lists memory-mapped in the scratch dir. The eight
prediction files must be the same bytes. No memory asserts (bench/rerank_memory.py measures).
"""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import read_parquet_provenance, write_parquet
from pipeline.retrieval.agree_io import load_id_types, prediction_id_types, write_predictions
from pipeline.retrieval.data import load_retrieval_set, scratch_dir
from pipeline.retrieval.index import is_memory_mapped
from pipeline.retrieval.rerank import METHODS, EgrWeights, rerank_all, tbr_rerank
from pipeline.retrieval.rerank_job import prediction_path, run_rerank
from pipeline.retrieval.retrieve_job import read_pool, run_retrieve
from tests.test_retrieve_mmap import make_project, small_blocks  # noqa: F401 (a fixture)

RETRIEVE = {"index": "flat", "pool": 20, "nlist": 4, "nprobe": 2, "hnsw_m": 8, "ef_search": 16,
            "ef_construction": 16, "recall_check": 10, "threads": 1, "batch_size": 16}
EGR = {"t2i": {"s": 0.9, "mask": 0.1, "s1": 0.99, "prompt": 0.01},
       "i2t": {"s": 0.8, "prompt": 0.2, "s1": 0.98, "mask": 0.02}}
SIDES = {"t2i": ("data/prepared captions.parquet", "image_file"),
         "i2t": ("data/prepared gallery.parquet", "caption_file")}


def shuffle_and_shorten(path, seed):
    """Rewrite a pool file with its rows in another order and the first 12 lists cut to 14
    candidates (as an approximate index may leave them), same provenance."""
    t = pq.read_table(path)
    n = t.num_rows
    ids, sc = t.column("item_ids").to_pylist(), t.column("scores").to_pylist()
    ids[:12], sc[:12] = [x[:14] for x in ids[:12]], [x[:14] for x in sc[:12]]
    t = t.set_column(1, "item_ids", [ids]).set_column(2, "scores", [sc])
    t = t.cast(pq.read_schema(path).remove_metadata())
    write_parquet(t.take(np.random.default_rng(seed).permutation(n)), path, read_parquet_provenance(path))


def reference_files(rs, pools, params, types, out):
    """Today's rerank: whole pools, rerank_all on the whole arrays, the lists written as files."""
    sides = {"t2i": (rs.caption_ids, rs.image_ids), "i2t": (rs.image_ids, rs.caption_ids)}
    lists = {d: read_pool(pools / f"{d}.parquet", *sides[d], SIDES[d][0], rs.info[SIDES[d][1]]) for d in sides}
    got = rerank_all(lists["t2i"][0], lists["t2i"][1], lists["i2t"][0], lists["i2t"][1], rs.image_emb,
                     rs.mask_emb, rs.prompt_emb, rs.n_entities, top_k=params["top_k"], pool=params["pool"],
                     pad=params["egr"]["pad"], weights=EgrWeights.from_params(params["egr"]),
                     absent_rank=params["tbr"]["absent_rank"])
    ptypes = prediction_id_types(types)
    for m in METHODS:
        for d, (qids, items) in sides.items():
            write_predictions(prediction_path(out, d, m), d,
                              ((q, [items[i] for i in row if i >= 0]) for q, row in zip(qids, got[m][d].tolist())),
                              ptypes[f"{d}_query"], ptypes[f"{d}_item"])
    changed = {f"{d}_{m}": int((got[m][d] != got["plain"][d]).any(1).sum()) for m in METHODS[1:] for d in sides}
    return got, changed, {d: lists[d][2] for d in lists}


@pytest.mark.parametrize("pad,top_k", [("agree", 17), ("entities", 5)])
def test_blockwise_memory_mapped_rerank_writes_the_same_bytes(tmp_path, small_blocks, pad, top_k):
    make_project(tmp_path)
    mem = load_retrieval_set("toy", root=tmp_path)
    pools = tmp_path / "pools"
    run_retrieve(mem, RETRIEVE, pools, {"embeddings_fingerprint": mem.fingerprint()})
    for k, d in enumerate(("t2i", "i2t")):
        shuffle_and_shorten(pools / f"{d}.parquet", k)
    params = {"top_k": top_k, "pool": 20, "egr": {"pad": pad, **EGR}, "tbr": {"absent_rank": 10000}}
    types = load_id_types(tmp_path / "data/prepared/toy/meta.json")
    got, changed, pool_prov = reference_files(mem, pools, params, types, tmp_path / "ref")
    assert all(v > 0 for k, v in changed.items() if "egr" in k)  # EGR and TBR really reorder lists here
    if top_k > 14:  # the shortened lists reach the files
        assert (got["plain"]["t2i"][:, -1] == -1).any()

    with scratch_dir(tmp_path) as d:
        mm = load_retrieval_set("toy", root=tmp_path, scratch=d)
        assert is_memory_mapped(mm.image_emb) and is_memory_mapped(mm.mask_emb)
        report = run_rerank(mm, pools, params, types, tmp_path / "new", {"stage": "rerank"}, scratch=d, block=7)
        assert {"plain_t2i.npy", "egr_t2i.npy", "plain_i2t.npy", "egr_i2t.npy"} <= {p.name for p in d.iterdir()}
    run_rerank(mem, pools, params, types, tmp_path / "in_memory", {"stage": "rerank"}, block=1000)

    for m in METHODS:
        for direction in ("t2i", "i2t"):
            want = prediction_path(tmp_path / "ref", direction, m).read_bytes()
            assert prediction_path(tmp_path / "new", direction, m).read_bytes() == want, (m, direction)
            assert prediction_path(tmp_path / "in_memory", direction, m).read_bytes() == want, (m, direction)
    prov = json.loads((tmp_path / "new" / "provenance.json").read_text())
    assert prov["lists_changed_vs_plain"] == changed == report["lists_changed_vs_plain"]
    assert prov["pool_provenance"] == pool_prov and prov["top_k"] == top_k and prov["stage"] == "rerank"
    new_prov = (tmp_path / "new" / "provenance.json").read_bytes()
    assert (tmp_path / "in_memory" / "provenance.json").read_bytes() == new_prov


def test_tbr_on_blocks_of_queries_equals_one_call():
    rng = np.random.default_rng(3)
    fwd = rng.integers(-1, 40, (53, 6))  # 53 queries over 40 items, some empty slots
    fwd = np.sort(fwd, 1)[:, ::-1].copy()  # -1 last
    back = rng.integers(0, 53, (40, 5))
    back[::3, 0] = np.arange(0, 40, 3) % 53  # some lists kept (q first in its top item's back list)
    whole, kept = tbr_rerank(fwd, back, 99)
    parts = [tbr_rerank(fwd[a:a + 8], back, 99, first_row=a, n_queries=53) for a in range(0, 53, 8)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), kept)
    for q in (0, 17, 52):  # AGREE's rule, one query by hand
        row = fwd[q].tolist()
        if row[0] >= 0 and back[row[0], 0] == q:
            assert whole[q].tolist() == row
        else:
            key = [(r + (list(back[c]).index(q) if c >= 0 and q in back[c] else 99)) / 2 if c >= 0 else np.inf
                   for r, c in enumerate(row)]
            assert whole[q].tolist() == [row[i] for i in np.argsort(key, kind="stable")]


def _toy_pools(tmp_path):
    """The toy retrieval set, its pools from a flat index, rerank params and id types."""
    make_project(tmp_path)
    mem = load_retrieval_set("toy", root=tmp_path)
    pools = tmp_path / "pools"
    run_retrieve(mem, RETRIEVE, pools, {"embeddings_fingerprint": mem.fingerprint()})
    params = {"top_k": 5, "pool": 20, "egr": {"pad": "agree", **EGR}, "tbr": {"absent_rank": 10000}}
    return mem, pools, params, load_id_types(tmp_path / "data/prepared/toy/meta.json")


def test_a_failure_half_way_leaves_the_previous_predictions_whole(tmp_path, small_blocks):
    mem, pools, params, types = _toy_pools(tmp_path)
    out = tmp_path / "predictions" / "retrieval"
    run_rerank(mem, pools, params, types, out, {"stage": "rerank", "run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    t = pq.read_table(pools / "i2t.parquet")  # one image query left without candidates: its file cannot be written
    ids, sc = t.column("item_ids").to_pylist(), t.column("scores").to_pylist()
    ids[3], sc[3] = [], []
    t = t.set_column(1, "item_ids", [ids]).set_column(2, "scores", [sc]).cast(pq.read_schema(pools / "i2t.parquet"))
    write_parquet(t, pools / "i2t.parquet", read_parquet_provenance(pools / "i2t.parquet"))
    with pytest.raises(ValueError, match="no candidates"):
        run_rerank(mem, pools, params, types, out, {"stage": "rerank", "run": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # texts_* were written first, then it failed
    assert sorted(p.name for p in out.parent.iterdir()) == ["retrieval"]  # no temp dir left


def test_damaged_pool_files_are_named_with_what_to_do(tmp_path, small_blocks):
    mem, pools, params, types = _toy_pools(tmp_path)
    path = pools / "i2t.parquet"
    good, prov = pq.read_table(path), read_parquet_provenance(path)

    def rerank():
        return run_rerank(mem, pools, params, types, tmp_path / "out", {"stage": "rerank"})

    sc = good.column("scores").to_pylist()
    sc[2] = sc[2][:-1]  # one score fewer than items
    write_parquet(good.set_column(2, "scores", [sc]).cast(good.schema), path, prov)
    with pytest.raises(ValueError, match=rf"{path}: query '[^']+' has 20 items but 19 scores: the pool file is damaged"):
        rerank()
    write_parquet(pa.concat_tables([good, good.slice(0, 1)]), path, prov)  # a query twice
    with pytest.raises(ValueError, match=r"listed more than once: \['"):
        rerank()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=rf"{path}: cannot read this pool file \(.*\); rerun `dvc repro`"):
        rerank()
