"""FAISS search against numpy brute force; approximate indexes checked against exact."""
import numpy as np
import pytest

from pipeline.retrieval.index import VectorIndex, exact_search, l2_normalize, numpy_search, recall_vs_exact, set_threads

set_threads(1)


def data(n=500, q=40, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(np.float32)


def brute(g, q, k):
    """Independent reference: cosine via float64 numpy, full argsort."""
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def test_flat_equals_brute_force():
    g, q = data()
    scores, ids = VectorIndex(g, "flat").search(q, 10, batch_size=7)  # several batches
    ref_s, ref_i = brute(g, q, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (40, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # the numpy baseline of the benchmark agrees too
    n_s, n_i = numpy_search(l2_normalize(g), l2_normalize(q), 10, batch_size=9)
    np.testing.assert_array_equal(n_i, ref_i)


def test_scale_invariance_and_k_cut_to_gallery():
    g, q = data(n=6, q=3)
    _, a = exact_search(g, q, 50)
    _, b = exact_search(g * 7.5, q * 0.01, 50)
    assert a.shape == (3, 6)  # k cut to the gallery size
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, brute(g, q, 6)[1])


def test_ties_broken_by_gallery_row():
    g = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)  # rows 0, 2, 3 identical
    s, i = exact_search(g, np.array([[1, 0]], np.float32), 4)
    assert i.tolist() == [[0, 2, 3, 1]]
    np.testing.assert_allclose(s, [[1, 1, 1, 0]], atol=1e-6)


def test_l2_normalize_zero_rows_and_nan():
    x = l2_normalize(np.array([[3, 4], [0, 0]], np.float64))
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        l2_normalize(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="one of flat, ivf, hnsw"):
        VectorIndex(x, "lsh")


def test_recall_vs_exact_by_hand():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 9, 1], [7, 8, -1]])
    assert recall_vs_exact(approx, exact, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_vs_exact(approx, exact, 1) == pytest.approx(0.0)  # top-1: {3} vs {1}, {7} vs {4}


def overlap(a, e, k):
    return np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a.tolist(), e.tolist())])


def test_ivf_recall_against_exact():
    g, q = data(n=2000, q=50, d=16, seed=1)
    _, exact = exact_search(g, q, 10)
    full = VectorIndex(g, "ivf", nlist=16, nprobe=16)  # every list probed: exact
    assert full.info["nlist"] == 16
    np.testing.assert_array_equal(full.search(q, 10)[1], exact)
    few = VectorIndex(g, "ivf", nlist=16, nprobe=1)
    _, approx = few.search(q, 10)
    r = recall_vs_exact(approx, exact, 10)
    assert r == pytest.approx(overlap(approx, exact, 10))
    assert r < 1.0  # one list of 16 misses neighbours on isotropic data
    tiny = VectorIndex(g[:5], "ivf", nlist=64, nprobe=8)
    assert tiny.info["nlist"] == 5 and tiny.info["nlist_requested"] == 64


def test_hnsw_recall_against_exact():
    g, q = data(n=1000, q=30, d=8, seed=2)
    _, exact = exact_search(g, q, 10)
    idx = VectorIndex(g, "hnsw", hnsw_m=8, ef_search=4, ef_construction=16, threads=1)
    _, approx = idx.search(q, 10)
    assert recall_vs_exact(approx, exact, 10) == pytest.approx(overlap(approx, exact, 10))
    idx2 = VectorIndex(g, "hnsw", hnsw_m=16, ef_search=400, ef_construction=100, threads=1)
    assert recall_vs_exact(idx2.search(q, 10)[1], exact, 10) >= 0.95  # wide search on 8-d data
