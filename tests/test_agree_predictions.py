"""The prediction files stay readable by AGREE's scripts: one id type per kind of id, no empty lists."""
import json

import numpy as np
import pytest

from pipeline.retrieval.agree_io import AgreeFormatError, load_id_types, prediction_id_types, write_predictions
from pipeline.retrieval.data import load_retrieval_set
from pipeline.retrieval.rerank_job import prediction_path, run_rerank
from pipeline.retrieval.retrieve_job import read_pool, run_retrieve, write_pool
from tests.test_retrieval_index import make_project

RETRIEVE = {"index": "flat", "pool": 5, "nlist": 4, "nprobe": 1, "hnsw_m": 8, "ef_search": 16,
            "ef_construction": 16, "recall_check": 10, "threads": 1, "batch_size": 4}
RERANK = {"top_k": 3, "pool": 5, "egr": {"pad": "agree", "t2i": {"s": 0.9, "mask": 0.1, "s1": 0.99, "prompt": 0.01},
                                         "i2t": {"s": 0.8, "prompt": 0.2, "s1": 0.98, "mask": 0.02}},
          "tbr": {"absent_rank": 10000}}


def raw_lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_prediction_id_types_one_type_per_kind():
    both_int = {"t2i_query": "int", "t2i_item": "int", "i2t_query": "int", "i2t_item": "int"}
    assert prediction_id_types(both_int) == both_int
    # AGREE's Flickr30k files: test_texts item_ids [9] (int), test_images image_id "9" (str)
    agree = {"t2i_query": "int", "t2i_item": "int", "i2t_query": "str", "i2t_item": "int"}
    assert prediction_id_types(agree) == {"t2i_query": "int", "t2i_item": "str", "i2t_query": "str", "i2t_item": "int"}
    caps_mixed = {"t2i_query": "int", "t2i_item": "int", "i2t_query": "int", "i2t_item": "str"}
    assert prediction_id_types(caps_mixed) == {"t2i_query": "str", "t2i_item": "int", "i2t_query": "int",
                                               "i2t_item": "str"}


def test_written_files_agree_when_ground_truth_id_types_differ(tmp_path):
    make_project(tmp_path)
    meta = tmp_path / "data/prepared/toy/meta.json"
    # int image ids in the texts file, str in the images file (as AGREE's own Flickr30k files)
    meta.write_text(json.dumps({"query_id_type": "int", "image_id_type": "str",
                                "text_item_id_type": "int", "image_item_id_type": "int"}))
    types = load_id_types(meta)
    assert types["t2i_item"] != types["i2t_query"]  # what the ground truth files hold
    rs = load_retrieval_set("toy", root=tmp_path)
    run_retrieve(rs, RETRIEVE, tmp_path / "pools", {"embeddings_fingerprint": rs.fingerprint()})
    out = tmp_path / "pred"
    run_rerank(rs, tmp_path / "pools", RERANK, types, out, {})
    for method in ("plain", "egr", "tbr", "egr_tbr"):
        texts = raw_lines(prediction_path(out, "t2i", method))
        images = raw_lines(prediction_path(out, "i2t", method))
        # AGREE's TBR script keys each file's lists by its query ids and looks the other file's
        # item ids up there: the JSON values must match, type included
        back_t = {x["query_id"]: x["item_ids"] for x in texts}
        back_i = {x["image_id"]: x["item_ids"] for x in images}
        assert all(i in back_i for x in texts for i in x["item_ids"])
        assert all(c in back_t for x in images for c in x["item_ids"])
        assert {type(k) for k in back_i} == {str} and {type(k) for k in back_t} == {int}
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["prediction_id_types"] == {"t2i_query": "int", "t2i_item": "str", "i2t_query": "str", "i2t_item": "int"}


def test_empty_item_list_is_an_error_naming_the_query(tmp_path):
    p = tmp_path / "texts.jsonl"
    with pytest.raises(AgreeFormatError, match=r"texts\.jsonl: query_id '12' has no candidates"):
        write_predictions(p, "t2i", [("8", ["9"]), ("12", [])], "int", "str")
    assert not p.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary left


def test_rerank_refuses_an_empty_pool(tmp_path):
    make_project(tmp_path)
    rs = load_retrieval_set("toy", root=tmp_path)
    pools = tmp_path / "pools"
    run_retrieve(rs, RETRIEVE, pools, {"embeddings_fingerprint": rs.fingerprint()})
    cand, sc, prov = read_pool(pools / "i2t.parquet", rs.image_ids, rs.caption_ids, "imgs", "caps")
    cand[2] = -1  # what an approximate index that finds nothing for image 2 leaves
    write_pool(pools / "i2t.parquet", rs.image_ids, rs.caption_ids, cand, sc, prov)
    types = load_id_types(tmp_path / "data/prepared/toy/meta.json")
    with pytest.raises(AgreeFormatError, match=rf"image_id '{rs.image_ids[2]}' has no candidates"):
        run_rerank(rs, pools, RERANK, types, tmp_path / "pred", {})
    assert np.all(read_pool(pools / "i2t.parquet", rs.image_ids, rs.caption_ids, "i", "c")[0][2] == -1)
