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


def test_numpy_baseline_cuts_ties_at_k_by_lowest_row():
    # eight identical rows tied at the top, k = 3 inside them: rows 1, 4, 5 in any argpartition
    # order must come out as the three lowest tied rows (an exact tie: dyadic values)
    g = np.zeros((12, 2), np.float32)
    g[:, 1] = 1.0
    tied = [1, 3, 4, 6, 7, 9, 10, 11]
    g[tied] = [1.0, 0.0]
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    for k in (3, 8, 9):
        s, i = numpy_search(g, q, k, batch_size=1)
        ref_s, ref_i = brute(g, q, k)
        assert i.tolist() == ref_i.tolist(), k
        np.testing.assert_array_equal(s, ref_s)
    assert numpy_search(g, q, 3)[1][0].tolist() == [1, 3, 4]


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
    tiny = VectorIndex(g[:5], "ivf", nlist=64, nprobe=8)  # too few to train 64 lists: cut, recorded
    assert tiny.info["nlist"] == 1 and tiny.info["nlist_requested"] == 64
    small = VectorIndex(g[:800], "ivf", nlist=64, nprobe=8)
    assert small.info["nlist"] == 800 // 39 and small.info["nprobe"] == 8


def test_hnsw_recall_against_exact():
    g, q = data(n=1000, q=30, d=8, seed=2)
    _, exact = exact_search(g, q, 10)
    idx = VectorIndex(g, "hnsw", hnsw_m=8, ef_search=4, ef_construction=16, threads=1)
    _, approx = idx.search(q, 10)
    assert recall_vs_exact(approx, exact, 10) == pytest.approx(overlap(approx, exact, 10))
    idx2 = VectorIndex(g, "hnsw", hnsw_m=16, ef_search=400, ef_construction=100, threads=1)
    assert recall_vs_exact(idx2.search(q, 10)[1], exact, 10) >= 0.95  # wide search on 8-d data


# ---- the retrieval set from real cache files; ids that do not match between files -----------

import json  # noqa: E402

import pyarrow as pa  # noqa: E402

from pipeline.artifacts import write_parquet  # noqa: E402
from pipeline.retrieval.data import IdMismatchError, load_retrieval_set  # noqa: E402
from pipeline.stores.shards import write_shard  # noqa: E402
from pipeline.stores.tables import write_caption_features  # noqa: E402

D, S = 8, 3


def write_test_manifests(prep, imgs, caps, query_id_type):
    """The prepared retrieval manifests of a test split: ``caps`` is [(caption_id, image_id)]."""
    prep.mkdir(parents=True)
    write_parquet(pa.table({"split": ["test"] * len(caps), "caption_id": [c for c, _ in caps],
                            "text": ["t"] * len(caps), "image_ids": [[i] for _, i in caps],
                            "entities": [["e"]] * len(caps)}), prep / "captions.parquet", {})
    write_parquet(pa.table({"split": ["test"] * len(imgs), "image_id": imgs,
                            "caption_ids": [[c for c, i in caps if i == im] for im in imgs]}),
                  prep / "gallery.parquet", {})
    (prep / "meta.json").write_text(json.dumps({"query_id_type": query_id_type, "image_id_type": "str"}))


def make_project(root, n_img=6, caps_per=2, drop_cache_caption=None, drop_cache_image=None, seed=0):
    """data/prepared/toy + features/toy/{patches,captions} with real writers; test split only."""
    rng = np.random.default_rng(seed)
    prep = root / "data" / "prepared" / "toy"
    imgs = [str(100 + i) for i in range(n_img)]
    caps = [(str(c), imgs[c // caps_per]) for c in range(n_img * caps_per)]
    write_test_manifests(prep, imgs, caps, "int")
    img_emb = rng.standard_normal((n_img, D)).astype(np.float32)
    keep = [i for i in imgs if i != drop_cache_image]
    write_shard(root / "features/toy/patches/shard-00000.h5", keep,
                {"pooled": img_emb[[imgs.index(i) for i in keep]], "is_fallback": np.zeros(len(keep), bool)},
                {"model": "toy"}, "fp")
    # captions near their image, so retrieval finds them
    cap_emb = np.stack([img_emb[imgs.index(i)] + 0.3 * rng.standard_normal(D) for _, i in caps]).astype(np.float32)
    # entity prompts: noisier views of the image; masked captions: unrelated
    prompts = np.stack([img_emb[imgs.index(i)] + 0.8 * rng.standard_normal((S, D)) for _, i in caps])
    ckeep = [k for k, (c, _) in enumerate(caps) if c != drop_cache_caption]
    write_caption_features(root / "features/toy/captions", [caps[k][0] for k in ckeep], cap_emb[ckeep],
                           prompts[ckeep], rng.standard_normal((len(ckeep), S, D)),
                           rng.integers(0, 4, len(ckeep)), {"model": "toy"})
    return img_emb, cap_emb, imgs, caps


def test_retrieval_set_matches_ids_and_normalises(tmp_path):
    img_emb, cap_emb, imgs, caps = make_project(tmp_path)
    rs = load_retrieval_set("toy", root=tmp_path)
    assert rs.image_ids == imgs and rs.caption_ids == [c for c, _ in caps]
    np.testing.assert_allclose(rs.image_emb, img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rs.mask_emb, axis=-1), 1.0, atol=1e-5)
    assert rs.t2i_gold["3"] == ["101"] and rs.i2t_gold["101"] == ["2", "3"]
    assert rs.fingerprint() == load_retrieval_set("toy", root=tmp_path).fingerprint()


def test_caption_cache_vs_manifest_mismatch_names_both_files(tmp_path):
    make_project(tmp_path, drop_cache_caption="5")
    with pytest.raises(IdMismatchError) as e:
        load_retrieval_set("toy", root=tmp_path)
    msg = str(e.value)
    assert "data/prepared/toy/captions.parquet" in msg and "features/toy/captions/captions.parquet" in msg
    assert "'5'" in msg


def test_embeddings_vs_gallery_mismatch_names_both_files(tmp_path):
    make_project(tmp_path, drop_cache_image="103")
    with pytest.raises(IdMismatchError) as e:
        load_retrieval_set("toy", root=tmp_path)
    msg = str(e.value)
    assert "data/prepared/toy/gallery.parquet" in msg and "features/toy/patches" in msg and "'103'" in msg


def test_retrieve_rerank_score_jobs_end_to_end(tmp_path):
    from pipeline.metrics.recall import recall_at_k
    from pipeline.retrieval.agree_io import load_id_types, read_predictions, read_result
    from pipeline.retrieval.rerank_job import run_rerank
    from pipeline.retrieval.retrieve_job import read_pool, run_retrieve
    from pipeline.retrieval.score_job import run_score

    make_project(tmp_path)
    rs = load_retrieval_set("toy", root=tmp_path)
    rparams = {"index": "flat", "pool": 5, "nlist": 4, "nprobe": 1, "hnsw_m": 8, "ef_search": 16,
               "ef_construction": 16, "recall_check": 10, "threads": 1, "batch_size": 4}
    pools = tmp_path / "features/toy/retrieval"
    run_retrieve(rs, rparams, pools, {"embeddings_fingerprint": rs.fingerprint()})
    cand, sc, prov = read_pool(pools / "t2i.parquet", rs.caption_ids, rs.image_ids, "caps", "imgs")
    ref_s, ref_i = brute(rs.image_emb, rs.caption_emb, 5)
    np.testing.assert_array_equal(cand, ref_i)
    assert prov["direction"] == "t2i" and prov["pool"] == 5
    # ivf reports its recall against exact search in the provenance
    run_retrieve(rs, {**rparams, "index": "ivf"}, tmp_path / "ivf", {})
    _, _, p2 = read_pool(tmp_path / "ivf" / "i2t.parquet", rs.image_ids, rs.caption_ids, "imgs", "caps")
    assert 0.0 <= p2["index"]["recall_vs_exact"]["at_10"] <= 1.0
    assert p2["index"]["nlist"] == 1 and p2["index"]["nlist_requested"] == 4  # 12 captions: cut to 12 // 39
    assert set(p2["index"]["recall_vs_exact"]) == {"queries", "at_10", "at_5"}  # at the pool too
    # queries whose approximate list is shorter than the pool are counted, not hidden
    rep = run_retrieve(rs, {**rparams, "index": "ivf", "nlist": 8, "pool": 12}, tmp_path / "ivf8", {})
    c8, _, p8 = read_pool(tmp_path / "ivf8" / "t2i.parquet", rs.caption_ids, rs.image_ids, "caps", "imgs")
    want = min(12, len(rs.image_ids))
    assert p8["index"]["short_lists"] == int(((c8 >= 0).sum(axis=1) < want).sum())
    assert rep["directions"]["t2i"]["short_lists"] == p8["index"]["short_lists"]

    rerank = {"top_k": 3, "pool": 5, "egr": {"pad": "agree", "t2i": {"s": 0.9, "mask": 0.1, "s1": 0.99, "prompt": 0.01},
                                             "i2t": {"s": 0.8, "prompt": 0.2, "s1": 0.98, "mask": 0.02}},
              "tbr": {"absent_rank": 10000}}
    types = load_id_types(tmp_path / "data/prepared/toy/meta.json")
    preds = tmp_path / "pred"
    run_rerank(rs, pools, rerank, types, preds, {})
    first = (preds / "texts_plain.jsonl").read_text().splitlines()[0]
    assert first == json.dumps({"query_id": 0, "item_ids": [rs.image_ids[i] for i in ref_i[0, :3]]})
    assert (preds / "images_egr_tbr.jsonl").read_text().startswith('{"image_id": "100", "item_ids": [')
    out = run_score(preds, rs.t2i_gold, rs.i2t_gold, [1, 5, 10], {"t2i": "caps", "i2t": "gallery"},
                    tmp_path / "m.json", tmp_path / "agree", tmp_path / "p.csv", tmp_path / "p.png")
    want = recall_at_k(read_predictions(preds / "texts_plain.jsonl", "t2i"), rs.t2i_gold)
    assert out["metrics"]["t2i_plain_r1"] == want["r1"] and out["metrics"]["t2i_plain_mean"] == want["mean"]
    assert read_result(tmp_path / "agree" / "image_output_egr.json")["r5"] == out["metrics"]["i2t_egr_r5"]
    assert (tmp_path / "p.png").stat().st_size > 0
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("k,t2i_plain,t2i_egr,t2i_tbr,t2i_egr_tbr")
    assert any("lists hold 3 items" in n for n in out["notes"])
    # lists for other embeddings than the pools were made from are refused
    rs.image_emb = rs.image_emb[::-1].copy()
    with pytest.raises(ValueError, match="other embeddings"):
        run_rerank(rs, pools, rerank, types, preds, {})


def test_align_heads_are_deterministic_and_learn(tmp_path):
    from pipeline.retrieval.align import AlignConfig, train_heads

    make_project(tmp_path, n_img=12)
    rs = load_retrieval_set("toy", root=tmp_path)
    cfg = AlignConfig(enabled=True, epochs=15, lr=0.01, batch_size=6, temperature=0.1, dim=4, seed=3, entity_weight=0.5)
    wi, wt, hist = train_heads(rs, cfg)
    wi2, wt2, _ = train_heads(rs, cfg)
    assert wi.shape == (D, 4)
    np.testing.assert_array_equal(wi, wi2)
    np.testing.assert_array_equal(wt, wt2)
    assert len(hist) == 15 and all(np.isfinite(h["loss"]) for h in hist)

    def full_nce(wi, wt):  # independent numpy InfoNCE, every image with all its captions, image side
        zi = rs.image_emb @ wi
        zt = rs.caption_emb @ wt
        zi /= np.linalg.norm(zi, axis=1, keepdims=True)
        zt /= np.linalg.norm(zt, axis=1, keepdims=True)
        logits = zi @ zt.T / 0.1  # (images, captions)
        gold = np.array([[rs.image_ids[i] in rs.t2i_gold[c] for c in rs.caption_ids] for i in range(len(rs.image_ids))])
        lse = np.log(np.exp(logits).sum(1, keepdims=True))
        return float(-(np.where(gold, logits - lse, 0).sum() / gold.sum()))

    from pipeline.retrieval.align import init_head

    w0 = init_head(D, 4, 3)
    assert full_nce(wi, wt) < full_nce(w0, w0) - 0.05


def _synthetic_split(rng, hidden, n_img, caps_per_img, noise, prefix):
    """Captions = a hidden linear map of their image + noise: zero-shot cosine sees little of it."""
    from pipeline.retrieval.data import RetrievalSet
    from pipeline.retrieval.index import l2_normalize

    d = hidden.shape[0]
    img = rng.standard_normal((n_img, d)).astype(np.float32)
    owner = np.repeat(np.arange(n_img), caps_per_img)
    cap = img[owner] @ hidden + noise * rng.standard_normal((owner.size, d)).astype(np.float32)
    iid = [f"{prefix}i{i}" for i in range(n_img)]
    cid = [f"{prefix}c{j}" for j in range(owner.size)]
    return RetrievalSet(
        image_ids=iid, caption_ids=cid, image_emb=l2_normalize(img), caption_emb=l2_normalize(cap),
        prompt_emb=np.zeros((owner.size, 2, d), np.float32), mask_emb=np.zeros((owner.size, 2, d), np.float32),
        n_entities=np.zeros(owner.size, np.int64), t2i_gold={c: [iid[o]] for c, o in zip(cid, owner)},
        i2t_gold={i: [c for c, o in zip(cid, owner) if o == k] for k, i in enumerate(iid)})


def test_align_heads_lift_held_out_recall_far_above_zero_shot():
    from pipeline.retrieval.align import AlignConfig, project, t2i_r1, train_heads

    rng = np.random.default_rng(0)
    d = 16
    hidden = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)  # a random rotation
    train = _synthetic_split(rng, hidden, 300, 2, 0.3, "tr")
    test = _synthetic_split(rng, hidden, 50, 2, 0.3, "te")  # images never seen in training
    zero_shot = t2i_r1(test, test.image_emb, test.caption_emb)
    cfg = AlignConfig(enabled=True, epochs=60, lr=0.01, batch_size=64, temperature=0.05, entity_weight=0.0)
    wi, wt, _ = train_heads(train, cfg)
    aligned = t2i_r1(test, project(test.image_emb, wi), project(test.caption_emb, wt))
    assert zero_shot < 20.0  # a rotation hides the pairing from a plain cosine (chance is 2 %)
    assert aligned > 80.0, (zero_shot, aligned)


def test_retrieve_refuses_queries_without_any_candidate(tmp_path, monkeypatch):
    """A query an approximate index finds nothing for would reach AGREE's files as an empty
    list: the retrieve stage stops and names the knob instead (fault injected in the search)."""
    from pipeline.retrieval.retrieve_job import run_retrieve

    make_project(tmp_path)
    rs = load_retrieval_set("toy", root=tmp_path)
    real = VectorIndex.search

    def lossy(self, q, k, batch_size=1024, progress=None):
        scores, ids = real(self, q, k, batch_size)
        ids[1] = -1  # the second query: nothing found
        return scores, ids

    monkeypatch.setattr(VectorIndex, "search", lossy)
    params = {"index": "ivf", "pool": 5, "nlist": 4, "nprobe": 1, "hnsw_m": 8, "ef_search": 16,
              "ef_construction": 16, "recall_check": 0, "threads": 1, "batch_size": 4}
    with pytest.raises(ValueError, match=r"retrieve t2i: 1 of \d+ queries got no candidate from the ivf index "
                                         r"\(e\.g\. .*\); raise retrieval\.nprobe"):
        run_retrieve(rs, params, tmp_path / "out", {})
    assert not (tmp_path / "out" / "t2i.parquet").exists()
