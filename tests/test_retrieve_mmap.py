"""The retrieve stage's memory-mapped path (galleries beyond RAM): embeddings streamed from the
shards and caption row groups into float32 .npy files in a temp dir, opened with mmap.

It must give the same arrays, fingerprint, lists and scores (bit for bit) as the in-memory
path for every index kind, and the temp dir must go away, also on an error. No memory or
timing asserts here (bench/retrieve_memory.py measures the peak RSS).
"""

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.retrieval.data as rdata
import pipeline.retrieval.index as rindex
import pipeline.stores.shards as shards
from pipeline.retrieval.data import SCRATCH_PREFIX, gather_rows, load_retrieval_set, scratch_dir
from pipeline.retrieval.index import is_memory_mapped
from pipeline.retrieval.retrieve_job import gallery_scratch, run_retrieve
from pipeline.stores.shards import ShardReader, write_shard
from pipeline.stores.tables import CaptionFeaturesWriter
from tests.test_retrieval_index import write_test_manifests

D, S = 16, 3
ARRAYS = ("image_emb", "caption_emb", "prompt_emb", "mask_emb")


def make_project(root, n_img=90, n_train=25, caps_per=3, seed=0, zero_image=True):
    """data/prepared/toy + features/toy/{patches (3 shards, shuffled, with train images), captions
    (many small row groups)}; duplicate vectors (exact ties) and one all-zero image."""
    rng = np.random.default_rng(seed)
    prep = root / "data" / "prepared" / "toy"
    imgs = [f"im{i:03d}" for i in range(n_img)]
    caps = [(f"c{c:04d}", imgs[c // caps_per]) for c in range(n_img * caps_per)]
    write_test_manifests(prep, imgs, caps, "str")
    emb = {i: rng.standard_normal(D).astype(np.float32) * rng.uniform(0.5, 3) for i in imgs}
    emb[imgs[7]] = emb[imgs[3]].copy()  # exact ties
    emb[imgs[11]] = 2 * emb[imgs[3]]
    if zero_image:  # an unusable image's zero feature (as a query, IVF-PQ finds nothing for it: not here)
        emb[imgs[5]] = np.zeros(D, np.float32)
    train = {f"tr{i:03d}": rng.standard_normal(D).astype(np.float32) for i in range(n_train)}
    order = list(rng.permutation(imgs + list(train)))  # cache order differs from the gallery's
    allv = {**emb, **train}
    for s, part in enumerate(np.array_split(np.array(order, dtype=object), 3)):
        ids = [str(x) for x in part]
        write_shard(root / f"features/toy/patches/shard-{s:05d}.h5", ids,
                    {"pooled": np.stack([allv[i] for i in ids]), "is_fallback": np.array([i == imgs[5] for i in ids])},
                    {"model": "toy"}, "fp")
    cap_emb = np.stack([emb[i] + 0.3 * rng.standard_normal(D) for _, i in caps]).astype(np.float32)
    cap_emb[4] = cap_emb[1]
    corder = rng.permutation(len(caps))
    with CaptionFeaturesWriter(root / "features/toy/captions", {"model": "toy"}, row_group_bytes=4096) as w:
        for b in np.array_split(corder, 7):
            w.add([caps[k][0] for k in b], cap_emb[b], rng.standard_normal((len(b), S, D)),
                  rng.standard_normal((len(b), S, D)), rng.integers(0, 4, len(b)))
    return imgs, caps


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks far smaller than the data, so every streamed / chunked loop runs many times."""
    monkeypatch.setattr(shards, "BLOCK_BYTES", 7 * D * 4)
    monkeypatch.setattr(rdata, "HASH_ROWS", 13)
    monkeypatch.setattr(rindex, "ADD_CHUNK", 29)
    monkeypatch.setattr(rindex, "EXACT_CHUNK", 31)
    monkeypatch.setattr(rindex, "RESCORE_QUERIES", 3)


def test_shard_blocks_equal_read_all(tmp_path, small_blocks):
    make_project(tmp_path)
    with ShardReader(tmp_path / "features/toy/patches") as r:
        whole = r.read_all("pooled")
        parts = list(r.iter_blocks("pooled"))
    assert len(parts) > 3
    got = np.concatenate([b for _, b in parts])
    assert [s for s, _ in parts] == list(np.cumsum([0] + [len(b) for _, b in parts])[:-1])
    assert np.array_equal(got, whole)


def test_memmapped_set_equals_in_memory(tmp_path, small_blocks):
    make_project(tmp_path)
    mem = load_retrieval_set("toy", root=tmp_path)
    with scratch_dir(tmp_path) as d:
        mm = load_retrieval_set("toy", root=tmp_path, scratch=d)
        for name in ARRAYS:
            a, b = getattr(mem, name), getattr(mm, name)
            assert is_memory_mapped(b) and not is_memory_mapped(a), name
            assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, name
            assert np.array_equal(a.view(np.uint32), np.asarray(b).view(np.uint32)), name  # bit for bit
        assert mm.image_ids == mem.image_ids and mm.caption_ids == mem.caption_ids
        assert np.array_equal(mm.n_entities, mem.n_entities)
        assert mm.info == mem.info and mm.info["zero_vectors"]["images"] == 1 and mm.info["fallback_images"] == 1
        assert mm.fingerprint() == mem.fingerprint()
        assert sorted(p.name for p in d.iterdir()) == ["captions.npy", "images.npy", "masks.npy", "prompts.npy"]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_lists_and_scores_identical(tmp_path, small_blocks, kind):
    make_project(tmp_path, zero_image=kind != "ivfpq")
    params = {"index": kind, "pool": 20, "nlist": 4, "nprobe": 4 if kind == "ivfpq" else 2, "hnsw_m": 8, "ef_search": 16,
              "ef_construction": 16, "pq_m": 4, "pq_bits": 4, "pq_rescore": 2, "recall_check": 50,
              "threads": 1, "batch_size": 7}
    mem = load_retrieval_set("toy", root=tmp_path)
    r_mem = run_retrieve(mem, params, tmp_path / "mem", {"fp": mem.fingerprint()})
    with scratch_dir(tmp_path) as d:
        mm = load_retrieval_set("toy", root=tmp_path, scratch=d)
        r_mm = run_retrieve(mm, params, tmp_path / "mm", {"fp": mm.fingerprint()})
    for direction in ("t2i", "i2t"):
        a, b = tmp_path / "mem" / f"{direction}.parquet", tmp_path / "mm" / f"{direction}.parquet"
        assert a.read_bytes() == b.read_bytes(), direction  # ids, scores and provenance
        assert pq.read_table(b).num_rows > 0
        ra, rb = dict(r_mem["directions"][direction]), dict(r_mm["directions"][direction])
        assert ra.pop("memory_mapped") is False and rb.pop("memory_mapped") is True
        for k in ("build_s", "search_s", "queries_per_s"):
            ra.pop(k), rb.pop(k)
        assert ra == rb
    if kind == "ivfpq":
        assert "fallback" not in r_mm["directions"]["t2i"]  # the PQ index was really built


def test_exact_search_over_a_memmap_equals_one_index(tmp_path, small_blocks):
    rng = np.random.default_rng(3)
    g = rindex.l2_normalize(rng.standard_normal((200, D)))
    g[50] = g[9]  # ties across chunks
    g[120] = g[9]
    q = rng.standard_normal((12, D)).astype(np.float32)
    q[0] = g[9]
    np.save(tmp_path / "g.npy", g)
    m = np.load(tmp_path / "g.npy", mmap_mode="r")
    for k in (1, 5, 40, 200, 500):
        s1, i1 = rindex.exact_search(g, q, k, threads=1)
        s2, i2 = rindex.exact_search(m, q, k, threads=1)
        assert np.array_equal(i1, i2) and np.array_equal(s1.view(np.uint32), s2.view(np.uint32)), k


def test_scratch_only_for_ivfpq_and_removed_on_success_and_error(tmp_path):
    make_project(tmp_path)
    with gallery_scratch({"index": "flat"}, tmp_path) as d:
        assert d is None
    with gallery_scratch({"index": "ivfpq"}, tmp_path) as d:
        load_retrieval_set("toy", root=tmp_path, scratch=d)
        assert d.is_dir() and len(list(d.iterdir())) == 4
    assert not d.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with gallery_scratch({"index": "ivfpq"}, tmp_path) as d:
            load_retrieval_set("toy", root=tmp_path, scratch=d)
            raise RuntimeError("boom")
    assert not d.exists()
    # an error while streaming (a corrupt shard is found after its blocks were read)
    p = tmp_path / "features/toy/patches/shard-00001.h5"
    import h5py
    with h5py.File(p, "r+") as f:
        f["pooled"].attrs[shards.DIGEST_ATTR] = "0" * 64
    with pytest.raises(shards.CorruptShardError):
        with gallery_scratch({"index": "ivfpq"}, tmp_path) as d:
            load_retrieval_set("toy", root=tmp_path, scratch=d)
    assert not d.exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(SCRATCH_PREFIX)]


def test_gather_rows_leaves_no_partial_file(tmp_path):
    def blocks():
        yield 0, np.ones((3, 4), np.float32)
        raise OSError("disk went away")

    with pytest.raises(OSError):
        gather_rows(blocks(), 6, np.array([5, 0, 2]), tmp_path / "x.npy", "x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="2 of 3 rows"):
        gather_rows(iter([(0, np.ones((3, 4), np.float32))]), 6, np.array([5, 0, 2]), tmp_path / "x.npy", "x")
    assert list(tmp_path.iterdir()) == []


def test_ivfpq_names_an_all_zero_query_instead_of_a_knob_that_cannot_help(tmp_path):
    make_project(tmp_path, zero_image=True)  # one image's embedding is all zeros (a zero fallback)
    params = {"index": "ivfpq", "pool": 20, "nlist": 4, "nprobe": 4, "hnsw_m": 8, "ef_search": 16,
              "ef_construction": 16, "pq_m": 4, "pq_bits": 4, "pq_rescore": 2, "recall_check": 0,
              "threads": 1, "batch_size": 7}
    rs = load_retrieval_set("toy", root=tmp_path)
    with pytest.raises(ValueError, match=r"retrieve i2t: 1 query is an all-zero embedding \(e\.g\. 'im005'.*"
                                         r"images\.fallback: blank or retrieval\.index: flat"):
        run_retrieve(rs, params, tmp_path / "out", {})
