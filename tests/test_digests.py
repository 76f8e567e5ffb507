"""Cache contents are verified, not assumed: a damaged shard or table is found, named and rebuilt.

The old failure: 256 bytes overwritten in the middle of a finished shard (size kept) became
64 finite float32 3.4e38 values; ``--check`` said ok and the resume logic found the shard done.
"""
import hashlib
import shutil

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stores.inspect import check
from pipeline.stores.shards import (
    DIGEST_ATTR,
    CorruptShardError,
    ShardError,
    ShardReader,
    plan_shards,
    run_shards,
    shard_fingerprint,
    shard_path,
    shard_status,
    write_shard,
)
from pipeline.artifacts import canonical_json
from pipeline.stores.tables import (
    DIGEST_KEY,
    NO_DIGEST,
    OLD_DIGEST_KEY,
    CaptionFeatures,
    FeatureTable,
    TableError,
    TextFeatures,
    stored_digests,
    table_digests,
    write_caption_features,
    write_feature_table,
    write_text_features,
)
from stages.inspect import main
from tests.corrupt import FLOAT_MAX, overwrite_middle

IDS = [f"img-{i:02d}" for i in range(12)]  # shards of 5: 5, 5, 2
PROV = {"stage": "patches", "model": "tiny"}


def patches(ids):
    """Deterministic patch-like arrays: one 4 KB chunk per item in patch_tokens."""
    rows = []
    for i in ids:
        rng = np.random.default_rng(int(hashlib.sha256(i.encode()).hexdigest()[:8], 16))
        rows.append({"pooled": rng.standard_normal(8).astype(np.float32),
                     "patch_tokens": rng.standard_normal((16, 64)).astype(np.float32),
                     "is_fallback": np.bool_(i.endswith("3"))})
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def dir_hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def caches(tmp_path):
    """A clean shard dir (the reference) and a copy to damage."""
    ref, out = tmp_path / "ref", tmp_path / "features" / "ds" / "patches"
    run_shards(IDS, 5, ref, "fp", PROV, patches)
    shutil.copytree(ref, out)
    return ref, out


# ---- shards ---------------------------------------------------------------------------------------

def test_every_dataset_has_a_digest_and_fletcher32(caches):
    ref, _ = caches
    with h5py.File(shard_path(ref, 0), "r") as f:
        for name, ds in f.items():
            assert len(ds.attrs[DIGEST_ATTR]) == 64, name
            assert ds.fletcher32 == (name != "ids"), name  # ids (variable-length strings): digest only
    fps = [shard_fingerprint("fp", c) for c in plan_shards(IDS, 5)]
    assert all(shard_status(shard_path(ref, k), fps[k]) == ("done", "") for k in range(3))


def test_overwritten_bytes_are_found_named_and_rebuilt_byte_identical(caches, capsys):
    ref, out = caches
    bad = shard_path(out, 1)
    overwrite_middle(bad, "patch_tokens")  # the middle chunk of shard 1: item 2 of IDS[5:10]
    damaged_id = IDS[7]

    # --check fails, naming the file and the dataset
    problems = check(out)
    assert any(p.startswith("shard-00001.h5: dataset 'patch_tokens': cannot read") and
               "a chunk fails its Fletcher-32 checksum (damaged bytes)" in p for p in problems), problems
    assert main([str(out), "--check"]) == 1
    assert "shard-00001.h5: dataset 'patch_tokens'" in capsys.readouterr().out

    # the reader raises a clear error naming file, dataset and item; other items still read
    with ShardReader(out) as r:
        with pytest.raises(CorruptShardError, match=rf"shard-00001.h5: dataset 'patch_tokens': cannot read row 2 "
                                                    rf"\(id '{damaged_id}'\).*damaged") as e:
            r.get(damaged_id)
        assert e.value.dataset == "patch_tokens"
        np.testing.assert_array_equal(r.get(IDS[6])["patch_tokens"], patches([IDS[6]])["patch_tokens"][0])
        with pytest.raises(CorruptShardError, match="shard-00001.h5: dataset 'patch_tokens'"):
            r.read_all("patch_tokens")
        assert r.read_all("pooled").shape == (12, 8)  # an undamaged dataset

    # the resume logic does not count it as done: it rewrites exactly that shard, and says so
    calls = []
    stats = run_shards(IDS, 5, out, "fp", PROV, lambda ids: calls.append(ids) or patches(ids))
    assert calls == [IDS[5:10]] and stats["shards_written"] == 1 and stats["shards_skipped"] == 2
    assert stats["verify_seconds"] > 0  # the checking time is reported apart from the writing
    assert list(stats["shards_failed_verification"]) == ["shard-00001.h5"]
    assert "patch_tokens" in stats["shards_failed_verification"]["shard-00001.h5"]
    err = capsys.readouterr().err
    assert f"{bad} fails verification" in err and "'patch_tokens'" in err and "rewriting it" in err
    assert dir_hashes(out) == dir_hashes(ref)
    assert check(out) == []


def test_a_rewrite_that_keeps_chunk_checksums_is_caught_by_the_digest(caches, capsys):
    """Values changed through HDF5 itself (the chunk checksums are recomputed): only the digest can tell."""
    ref, out = caches
    with h5py.File(shard_path(out, 2), "r+") as f:
        f["pooled"][1] = np.full(8, 3.4e38, np.float32)
    assert "shard-00002.h5: dataset 'pooled': content does not match its sha256 digest" in check(out)
    with ShardReader(out) as r:
        assert r.get(IDS[11])["pooled"][0] == np.float32(3.4e38)  # a row read cannot know
        with pytest.raises(CorruptShardError, match="shard-00002.h5: dataset 'pooled': content does not match"):
            r.read_all("pooled")  # a whole read checks the digest
    stats = run_shards(IDS, 5, out, "fp", PROV, patches)
    assert stats["shards_failed_verification"] == {
        "shard-00002.h5": "dataset 'pooled': content does not match its sha256 digest"}
    assert dir_hashes(out) == dir_hashes(ref)


def test_changed_ids_are_caught_at_open(caches):
    _, out = caches
    with h5py.File(shard_path(out, 0), "r+") as f:
        f["ids"][0] = "img-99"
    with pytest.raises(CorruptShardError, match="shard-00000.h5: dataset 'ids': content does not match"):
        ShardReader(out)
    assert "shard-00000.h5: dataset 'ids': content does not match its sha256 digest" in check(out)


def test_shards_written_before_digests_are_rebuilt_with_a_message(caches, capsys):
    ref, out = caches
    with h5py.File(shard_path(out, 0), "r+") as f:  # what an older writer left: no digests
        for ds in f.values():
            del ds.attrs[DIGEST_ATTR]
    with pytest.raises(ShardError, match=r"shard-00000.h5: no content digest on .*rerun the stage"):
        ShardReader(out)
    assert "shard-00000.h5: dataset 'pooled': no content digest (written before shards stored digests)" in check(out)
    assert main([str(out), "--check"]) == 1
    stats = run_shards(IDS, 5, out, "fp", PROV, patches)
    assert stats["shards_failed_verification"] == {
        "shard-00000.h5": "no content digest (written before shards stored digests)"}
    assert "shard-00000.h5 fails verification (no content digest" in capsys.readouterr().err
    assert dir_hashes(out) == dir_hashes(ref)


def test_write_shard_keeps_bytes_deterministic_with_checksums(tmp_path):
    arrays = patches(IDS[:3])
    write_shard(tmp_path / "a.h5", IDS[:3], arrays, PROV, "fp", compression="lzf")
    write_shard(tmp_path / "b.h5", IDS[:3], arrays, PROV, "fp", compression="lzf")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    with ShardReader(tmp_path / "a.h5") as r:
        np.testing.assert_array_equal(r.read_all("patch_tokens"), arrays["patch_tokens"])


# ---- Parquet tables -----------------------------------------------------------------------------

def text_cache(d, dim=64):
    rng = np.random.default_rng(0)
    rows = [{"sample_id": f"s{i}", "n_words": 4, "feats": rng.standard_normal((4, 2, dim)).astype(np.float32)}
            for i in range(6)]
    write_text_features(d, rows, {"PER": np.zeros((2, dim)), "LOC": np.ones((2, dim))}, PROV)
    return rows


def rewrite_one_value(path, column, value=3.4e38):
    """Rewrite the file with one value of an array column changed, keeping the old metadata (digests)."""
    t = pq.read_table(path)
    footer = pq.read_metadata(path).metadata
    col = t.column(column).combine_chunks()
    vals = col.values.to_numpy().copy()
    vals[len(vals) // 2] = value
    new = pa.LargeListArray.from_arrays(col.offsets, pa.array(vals))
    t = t.set_column(t.column_names.index(column), column, new).replace_schema_metadata(t.schema.metadata)
    with pq.ParquetWriter(path, t.schema) as w:  # one row group, as written, and the stored digests
        w.write_table(t)
        w.add_key_value_metadata({DIGEST_KEY: footer[DIGEST_KEY]})


def test_a_changed_table_value_is_named_on_read_and_by_check(tmp_path, capsys):
    d = tmp_path / "features" / "tw" / "text"
    text_cache(d)
    rewrite_one_value(d / "words.parquet", "feats")
    tf = TextFeatures(d)  # opening reads only the ids and counts (checked); the arrays on first read
    with pytest.raises(TableError, match=r"words.parquet: column 'feats', row group 0: content does not match its "
                                         r"sha256 digest.*dvc repro text@tw"):
        tf.get("s3")
    assert check(d) == [f"{d / 'words.parquet'}: column 'feats', row group 0: content does not match its sha256 "
                        f"digest: the file is damaged; rerun the stage that writes it"]
    assert main([str(d), "--check"]) == 1
    assert "column 'feats', row group 0: content does not match" in capsys.readouterr().out
    assert FeatureTable(d / "words.parquet", verify=False).num_rows == 6  # a tolerant look is still possible


def test_flipped_bytes_in_a_parquet_page_fail_the_check(tmp_path, capsys):
    d = tmp_path / "text"
    text_cache(d)
    path = d / "words.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("feats."))
    size_before = path.stat().st_size
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    assert chunk.total_compressed_size > 2 * len(FLOAT_MAX)
    with open(path, "r+b") as fh:
        fh.seek(start + (chunk.total_compressed_size - len(FLOAT_MAX)) // 2)
        fh.write(FLOAT_MAX)
    assert path.stat().st_size == size_before
    # snappy decodes the damaged page without complaint: only the digest tells
    with pytest.raises(TableError, match="words.parquet: column 'feats', row group 0: content does not match"):
        TextFeatures(d).get("s0")
    assert check(d) == [f"{path}: column 'feats', row group 0: content does not match its sha256 digest: the file "
                        f"is damaged; rerun the stage that writes it"]
    assert main([str(d), "--check"]) == 1


def test_caption_table_value_change_is_caught(tmp_path):
    d = tmp_path / "features" / "fl" / "captions"
    rng = np.random.default_rng(1)
    write_caption_features(d, ["a", "b", "c"], rng.standard_normal((3, 8)), rng.standard_normal((3, 2, 8)),
                           rng.standard_normal((3, 2, 8)), [1, 2, 0], PROV)
    rewrite_one_value(d / "captions.parquet", "mask_emb")
    with pytest.raises(TableError, match=r"captions.parquet: column 'mask_emb', row group 0: content does not "
                                         r"match.*captions@fl"):
        CaptionFeatures(d).get("b")
    assert main([str(d), "--check"]) == 1


def test_tables_written_before_digests(tmp_path):
    d = tmp_path / "features" / "tw" / "text"
    text_cache(d)
    t = pq.read_table(d / "words.parquet")  # the footer's digests are not carried over by write_table
    pq.write_table(t, d / "words.parquet")
    assert DIGEST_KEY not in (pq.read_metadata(d / "words.parquet").metadata or {})
    assert not FeatureTable(d / "words.parquet").digested  # a plain Parquet file reads as before
    with pytest.raises(TableError, match=r"words.parquet: no per-row-group content digest.*dvc repro text@tw"):
        TextFeatures(d)
    assert check(d) == [f"words.parquet: {NO_DIGEST}; rerun the stage that writes it"]


def test_tables_of_the_older_format_are_refused(tmp_path):
    """The older format (one sha256 per whole column in the schema metadata) is refused, not misread."""
    d = tmp_path / "features" / "tw" / "text"
    text_cache(d)
    t = pq.read_table(d / "words.parquet")
    old = {**t.schema.metadata, OLD_DIGEST_KEY: canonical_json(table_digests(t)).encode()}
    pq.write_table(t.replace_schema_metadata(old), d / "words.parquet")
    with pytest.raises(TableError, match=r"words.parquet: no per-row-group content digest.*rebuild it.*text@tw"):
        TextFeatures(d)
    assert main([str(d), "--check"]) == 1


def test_table_digests_do_not_depend_on_chunks_or_row_group_size(tmp_path):
    write_feature_table(tmp_path / "t.parquet", {"id": ["a", "b", "c", "d"], "n": [1, 2, 3, 4]},
                        {"x": [np.zeros((2, 3)), np.ones((1, 3)), np.full((4, 3), 2.0), np.zeros((0, 3))]}, PROV)
    t = pq.read_table(tmp_path / "t.parquet")
    pq.write_table(t, tmp_path / "u.parquet", row_group_size=1)  # four row groups: four chunks per column
    u = pq.read_table(tmp_path / "u.parquet")
    assert u.column("x").num_chunks == 4
    assert table_digests(u) == table_digests(t)
    # the same rows cut into 1-row row groups by the writer: one digest per row group, all verified
    write_feature_table(tmp_path / "v.parquet", {"id": ["a", "b", "c", "d"], "n": [1, 2, 3, 4]},
                        {"x": [np.zeros((2, 3)), np.ones((1, 3)), np.full((4, 3), 2.0), np.zeros((0, 3))]}, PROV,
                        row_group_bytes=1)
    v = FeatureTable(tmp_path / "v.parquet")
    assert v.digested and v.num_row_groups == 4 and v.verify_all() == []
    assert len(stored_digests(tmp_path / "v.parquet")["row_groups"]) == 4
