"""Recall@K against hand-computed values; AGREE prediction/result formats and round trips."""
import json

import numpy as np
import pytest

from pipeline.metrics.recall import RecallInputError, first_hit_ranks, invert_relevance, recall_at_k, recall_curve
from pipeline.retrieval.agree_io import (
    AgreeFormatError,
    load_id_types,
    read_id_lists,
    read_predictions,
    read_result,
    result_json,
    write_predictions,
    write_result,
)


def test_text_to_image_recall_by_hand():
    imgs = [f"i{n}" for n in range(10)]
    ranked = {
        "c1": imgs,                                    # gold i0 at rank 0
        "c2": imgs[3:] + imgs[:3],                     # gold i6 at rank 3
        "c3": imgs[::-1],                              # gold i2 at rank 7
        "c4": imgs[:5],                                # gold i9 absent
    }
    gold = {"c1": ["i0"], "c2": ["i6"], "c3": ["i2"], "c4": ["i9"]}
    r = recall_at_k(ranked, gold)
    assert r == {"r1": 25.0, "r5": 50.0, "r10": 75.0, "mean": 50.0}
    np.testing.assert_array_equal(first_hit_ranks(ranked, gold), [0, 3, 7, np.inf])
    np.testing.assert_allclose(recall_curve(first_hit_ranks(ranked, gold), 8), [25, 25, 25, 50, 50, 50, 50, 75])


def test_image_to_text_any_caption_counts():
    gold_t2i = {"a1": ["A"], "a2": ["A"], "b1": ["B"], "b2": ["B"], "c1": ["C"]}
    gold = invert_relevance(gold_t2i)
    assert gold == {"A": {"a1", "a2"}, "B": {"b1", "b2"}, "C": {"c1"}}
    ranked = {"A": ["b1", "a2", "a1"],  # first own caption at rank 1
              "B": ["b2", "b1", "a1"],  # rank 0
              "C": ["a1", "a2", "b1"]}  # none
    r = recall_at_k(ranked, gold, ks=(1, 2, 3))
    assert r["r1"] == pytest.approx(100 / 3) and r["r2"] == pytest.approx(200 / 3) and r["r3"] == pytest.approx(200 / 3)
    assert r["mean"] == pytest.approx(500 / 9)


def test_missing_or_extra_queries_are_errors():
    with pytest.raises(RecallInputError, match=r"1 queries of gold.json have no list in pred.jsonl.*'q2'"):
        recall_at_k({"q1": ["x"]}, {"q1": ["x"], "q2": ["y"]}, pred_name="pred.jsonl", gold_name="gold.json")
    with pytest.raises(RecallInputError, match="not in ground truth"):
        recall_at_k({"q1": ["x"], "zz": []}, {"q1": ["x"]})


def test_agree_prediction_files_exact_text_and_round_trip(tmp_path):
    p = tmp_path / "test_texts_predictions.jsonl"
    write_predictions(p, "t2i", [("8", ["9", "17"]), ("12", ["17"])], query_type="int", item_type="str")
    assert p.read_text() == ('{"query_id": 8, "item_ids": ["9", "17"]}\n'
                             '{"query_id": 12, "item_ids": ["17"]}\n')
    assert read_predictions(p, "t2i") == {"8": ["9", "17"], "12": ["17"]}
    q = tmp_path / "test_images_predictions.jsonl"
    write_predictions(q, "i2t", [("9", ["8", "12"])], query_type="str", item_type="int")
    assert q.read_text() == '{"image_id": "9", "item_ids": [8, 12]}\n'
    assert read_predictions(q, "i2t") == {"9": ["8", "12"]}
    with pytest.raises(AgreeFormatError, match="not an integer"):
        write_predictions(tmp_path / "x.jsonl", "t2i", [("abc", [])], "int", "str")


def test_agree_ground_truth_and_bad_lines(tmp_path):
    gt = tmp_path / "flickr30k_test_texts.jsonl"
    gt.write_text('{"query_id": 8, "query_text": "a dog", "item_ids": [9]}\n\n'
                  '{"query_id": 9, "query_text": "a cat", "item_ids": ["10"]}\n')
    assert read_id_lists(gt, "query_id") == {"8": ["9"], "9": ["10"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query_id": 8, "item_ids": [9]}\n{"query_id": 8, "item_ids": [9]}\n')
    with pytest.raises(AgreeFormatError, match=r"bad.jsonl:2: query_id 8 appears twice"):
        read_id_lists(bad, "query_id")
    bad.write_text('{"image_id": 8, "item_ids": [9]}\nnot json\n')
    with pytest.raises(AgreeFormatError, match=r"bad.jsonl:2: invalid JSON"):
        read_predictions(bad, "i2t")
    bad.write_text('{"image_id": 8, "items": [9]}\n')
    with pytest.raises(AgreeFormatError, match=r"bad.jsonl:1: expected keys 'image_id' and 'item_ids'"):
        read_predictions(bad, "i2t")


def test_agree_result_json(tmp_path):
    r = {"r1": 89.9, "r5": 98.4, "r10": 99.5, "mean": (89.9 + 98.4 + 99.5) / 3}
    p = write_result(tmp_path / "text_output.json", r)
    obj = json.loads(p.read_text())
    assert list(obj) == ["success", "score", "scoreJson"] and obj["success"] is True
    assert obj["score"] == pytest.approx(95.93333333333334)
    assert obj["scoreJson"] == {"score": obj["score"], "mean_recall": obj["score"], "r1": 89.9, "r5": 98.4, "r10": 99.5}
    assert read_result(p) == pytest.approx(r)
    assert result_json(r) == obj


def test_meta_id_types(tmp_path):
    m = tmp_path / "meta.json"
    m.write_text('{"query_id_type": "int", "image_id_type": "str", "image_item_id_type": "mixed"}')
    assert load_id_types(m) == {"t2i_query": "int", "t2i_item": "str", "i2t_query": "str", "i2t_item": "str"}
    m.write_text('{"query_id_type": "int", "image_id_type": "int", "text_item_id_type": "str"}')
    assert load_id_types(m) == {"t2i_query": "int", "t2i_item": "str", "i2t_query": "int", "i2t_item": "int"}
    m.write_text('{"query_id_type": "float"}')
    with pytest.raises(AgreeFormatError, match="meta.json: query_id_type"):
        load_id_types(m)
