"""IVF-PQ with exact re-scoring: against brute-force numpy, flat search, ties and bad params."""
import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.retrieval.index import TIE_FETCH, VectorIndex, exact_scores, l2_normalize, set_threads

set_threads(1)
REPO = Path(__file__).resolve().parents[1]


def clustered(n, q, d, seed=0, clusters=20):
    """Unit gallery (n, d) in clusters, and queries (q, d) near gallery rows (a caption near its image)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    g = l2_normalize(centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32))
    rows = rng.choice(n, q, replace=False)
    qs = l2_normalize(g[rows] + 0.3 * rng.standard_normal((q, d)).astype(np.float32))
    return g, qs


def brute(g, q, k):
    """Independent reference: float64 cosine, stable argsort (ties: lower row first)."""
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def test_lists_equal_exact_search_where_the_exact_pool_was_fetched():
    g, q = clustered(3000, 60, 32, seed=1)
    k = 20
    pq = VectorIndex(g, "ivfpq", nlist=16, nprobe=3, pq_m=8, pq_bits=6, pq_rescore=2, ivf_niter=8, normalize=False)
    assert pq.info["code_bytes"] == 6 and pq.info["nlist"] == 16 and pq.fetch_size(k) == 2 * k + TIE_FETCH
    s, i = pq.search(q, k, batch_size=25)
    fs, fi = VectorIndex(g, "flat", normalize=False).search(q, k, batch_size=25)
    _, ref = brute(g, q, k)
    np.testing.assert_array_equal(fi, ref)
    _, fetched = pq.index.search(q, pq.fetch_size(k))  # the PQ candidates re-scoring saw
    covered = np.array([set(r) <= set(f) for r, f in zip(ref.tolist(), fetched.tolist())])
    assert 0 < covered.sum() < len(q)  # a real test of both cases at these settings
    np.testing.assert_array_equal(i[covered], ref[covered])
    np.testing.assert_array_equal(s[covered], fs[covered])  # bit-equal to flat's scores
    # where the pool was not all fetched, every score returned is still the exact one
    np.testing.assert_array_equal(s, exact_scores(q, g, i))
    np.testing.assert_allclose(s, np.take_along_axis(q.astype(np.float64) @ g.T.astype(np.float64), i, 1), atol=1e-6)
    assert np.all(np.diff(s, axis=1) <= 0)


def test_every_list_probed_and_every_candidate_rescored_is_exact_search():
    g, q = clustered(500, 30, 16, seed=2)
    pq = VectorIndex(g, "ivfpq", nlist=8, nprobe=8, pq_m=4, pq_bits=4, pq_rescore=100, normalize=False)
    assert pq.fetch_size(10) == 500  # the whole gallery
    s, i = pq.search(q, 10)
    fs, fi = VectorIndex(g, "flat", normalize=False).search(q, 10)
    np.testing.assert_array_equal(i, brute(g, q, 10)[1])
    np.testing.assert_array_equal(i, fi)
    np.testing.assert_array_equal(s, fs)


def test_flat_scores_do_not_depend_on_the_batch():
    """FAISS's BLAS path (20+ queries) and its per-pair path differ in the last bits at 512-d;
    flat re-scores with the per-pair one, so batch 1 and batch 64 agree bit for bit."""
    g, q = clustered(5000, 64, 512, seed=3)
    flat = VectorIndex(g, "flat", normalize=False)
    s1, i1 = flat.search(q, 16, batch_size=1)
    s64, i64 = flat.search(q, 16, batch_size=64)
    np.testing.assert_array_equal(i1, i64)
    np.testing.assert_array_equal(s1, s64)


def test_ties_are_ordered_by_row_also_past_the_fetch():
    g, _ = clustered(400, 1, 16, seed=4)
    dup = [7, 40, 41, 90, 150, 151, 152, 260, 261, 262, 263, 300, 301, 302, 350, 351, 352, 353, 354, 355,
           356, 357, 380, 381, 382, 383, 390, 391, 392, 399]  # 30 copies of row 7
    g[dup] = g[7]
    q = g[[7]] * 3.0  # scale does not matter
    pq = VectorIndex(g, "ivfpq", nlist=4, nprobe=4, pq_m=4, pq_bits=4, pq_rescore=1)
    assert pq.fetch_size(5) == 13 < len(dup)  # the ties run past the first fetch
    for k in (1, 5, 30, 32):
        s, i = pq.search(q, k)
        want = dup[:k] if k <= len(dup) else dup
        assert i[0, :len(want)].tolist() == want, k
        assert len(set(s[0, :len(want)].tolist())) == 1  # identical rows: identical exact scores
    s, i = pq.search(q, 32)
    assert s[0, 30] < s[0, 29]


def test_small_gallery_falls_back_to_exact_search_and_says_so():
    g, q = clustered(100, 10, 16, seed=5)
    pq = VectorIndex(g, "ivfpq", nlist=64, pq_m=4, pq_bits=8)
    assert pq.info["fallback"].startswith("flat: 100 gallery vectors are fewer than the 2**pq_bits = 256")
    flat = VectorIndex(g, "flat")
    for a, b in zip(pq.search(q, 12), flat.search(q, 12)):
        np.testing.assert_array_equal(a, b)
    cut = VectorIndex(g, "ivfpq", nlist=500, nprobe=8, pq_m=4, pq_bits=4)  # 16 codes: trains; nlist cut to N // 39
    assert cut.info["nlist"] == 2 and cut.info["nlist_requested"] == 500 and "fallback" not in cut.info
    assert cut.info["nprobe"] == 2
    assert cut.info["training_points"] == 100


@pytest.mark.parametrize("kw,message", [
    ({"pq_m": 5}, r"retrieval.pq_m \(5\) must divide the embedding dim \(16\)"),
    ({"pq_m": 0}, r"retrieval.pq_m must be >= 1, got 0"),
    ({"pq_bits": 17}, r"retrieval.pq_bits must be in 1..16, got 17"),
    ({"pq_rescore": 0}, r"retrieval.pq_rescore must be >= 1, got 0"),
    ({"nprobe": 0}, r"retrieval.nprobe must be >= 1, got 0"),
])
def test_bad_index_params_name_the_param(kw, message):
    g, _ = clustered(300, 1, 16)
    with pytest.raises(ValueError, match=message):
        VectorIndex(g, "ivfpq", **{"pq_m": 4, "pq_bits": 4, **kw})


@pytest.mark.parametrize("key,value,message", [
    ("pq_bits", 20, r"retrieval.pq_bits = 20: should be less than or equal to 16"),
    ("pq_m", 0, r"retrieval.pq_m = 0: should be greater than or equal to 1"),
    ("pq_rescore", 1.5, r"retrieval.pq_rescore = 1.5: should be a valid integer"),
])
def test_params_yaml_refuses_bad_pq_values(tmp_path, key, value, message):
    from pipeline.params import ParamsError, load_params

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    p = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    p["retrieval"].update(index="ivfpq", **{key: value})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.raises(ParamsError, match=r"^params.yaml: 1 problem: " + message):
        load_params("retrieve", item="demo_flickr", root=tmp_path)


def test_retrieve_job_with_ivfpq_end_to_end(tmp_path, capsys):
    from pipeline.retrieval.data import load_retrieval_set
    from pipeline.retrieval.retrieve_job import read_pool, recall_line, run_retrieve
    from tests.test_retrieval_index import make_project

    make_project(tmp_path, n_img=40, caps_per=2)  # 40 images (8-d), 80 captions
    rs = load_retrieval_set("toy", root=tmp_path)
    params = {"index": "ivfpq", "pool": 6, "nlist": 4, "nprobe": 4, "hnsw_m": 8, "ef_search": 16,
              "ef_construction": 16, "pq_m": 4, "pq_bits": 4, "pq_rescore": 20, "recall_check": 50,
              "threads": 1, "batch_size": 16}
    rep = run_retrieve(rs, params, tmp_path / "pq", {"stage": "retrieve"})
    run_retrieve(rs, {**params, "index": "flat"}, tmp_path / "flat", {})
    for d, (qids, gids, qf, gf) in {"t2i": (rs.caption_ids, rs.image_ids, "caps", "imgs"),
                                    "i2t": (rs.image_ids, rs.caption_ids, "imgs", "caps")}.items():
        c, s, prov = read_pool(tmp_path / "pq" / f"{d}.parquet", qids, gids, qf, gf)
        fc, fs, _ = read_pool(tmp_path / "flat" / f"{d}.parquet", qids, gids, qf, gf)
        np.testing.assert_array_equal(c, fc)  # every list probed, 20 x pool >= gallery: exact
        np.testing.assert_array_equal(s, fs)
        info = prov["index"]
        assert info["kind"] == "ivfpq" and info["pq_m"] == 4 and info["code_bytes"] == 2 and "fallback" not in info
        assert info["recall_vs_exact"] == {"queries": min(50, len(qids)), "at_10": 1.0, "at_6": 1.0}
    c, _, _ = read_pool(tmp_path / "pq" / "t2i.parquet", rs.caption_ids, rs.image_ids, "caps", "imgs")
    np.testing.assert_array_equal(c, brute(rs.image_emb, rs.caption_emb, 6)[1])
    assert recall_line(rep["directions"]["t2i"]) == ", recall vs exact @6 1.0000 @10 1.0000 (50 queries)"
    assert recall_line({"kind": "flat"}) == ""
    # 8 bits need 256 training vectors: the 40-image gallery is searched exactly, and it is said
    rep8 = run_retrieve(rs, {**params, "pq_bits": 8, "pq_rescore": 1}, tmp_path / "pq8", {})
    assert "fallback" in rep8["directions"]["t2i"] and "fallback" in rep8["directions"]["i2t"]
    assert "ivfpq index not built, searched exactly instead" in capsys.readouterr().err
    c8, _, p8 = read_pool(tmp_path / "pq8" / "t2i.parquet", rs.caption_ids, rs.image_ids, "caps", "imgs")
    np.testing.assert_array_equal(c8, read_pool(tmp_path / "flat" / "t2i.parquet", rs.caption_ids, rs.image_ids,
                                                "caps", "imgs")[0])
    assert p8["index"]["fallback"].startswith("flat: 40 gallery vectors")
