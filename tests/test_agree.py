"""AGREE Flickr30k reader on real JSON-lines files written into tmp_path."""
import json

import pytest

from pipeline.data.agree import AgreeFormatError, read_agree, restore_id

TRAIN = [
    {"image": "flickr30k-images/10002456.jpg", "caption": "Four men on top of a tall structure.", "image_id": 1,
     "segs": ["four men", "top of a tall structure", "a tall structure"],
     "preds": [{"men": 0.62}, {"object": 0.61}]},
    {"image": "flickr30k-images/10002456.jpg", "caption": "Men on a roof.", "image_id": 1, "segs": ["men", ""]},
    {"image": "flickr30k-images/1000092795.jpg", "caption": "A dog runs.", "image_id": 2, "segs": []},
]
TEXTS = [
    {"query_id": 0, "query_text": "A dog in the snow.", "item_ids": [9]},
    {"query_id": 1, "query_text": "A brown dog plays.", "item_ids": [9]},
    {"query_id": 2, "query_text": "Two men near a car.", "item_ids": [10]},
]
IMAGES = [
    {"image_id": "9", "item_ids": [0, 1]},
    {"image_id": "10", "item_ids": [2]},
]
ENTS = [
    {"query_id": 0, "query_text": "A dog in the snow.", "items": ["A dog", "the snow"]},
    {"query_id": 1, "query_text": "A brown dog plays.", "items": ["A brown dog"]},
    {"query_id": 2, "query_text": "Two men near a car.", "items": []},
]


def jl(tmp_path, name, rows, extra_lines=()):
    p = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows] + list(extra_lines)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def files(tmp_path, train=TRAIN, texts=TEXTS, images=IMAGES, ents=ENTS):
    return dict(train=jl(tmp_path, "train.jsonl", train), test_texts=jl(tmp_path, "test_texts.jsonl", texts),
                test_images=jl(tmp_path, "test_images.jsonl", images),
                test_entities=jl(tmp_path, "test_texts_segs.jsonl", ents))


def test_reads_all_four_files(tmp_path):
    d = read_agree(**files(tmp_path))
    rows = d.caption_rows()
    assert rows[0] == {"split": "train", "caption_id": "train-1", "text": "Four men on top of a tall structure.",
                       "image_ids": ["1"], "entities": ["four men", "top of a tall structure", "a tall structure"]}
    assert rows[1]["caption_id"] == "train-2" and rows[1]["entities"] == ["men"]  # empty entity dropped
    assert rows[3] == {"split": "test", "caption_id": "0", "text": "A dog in the snow.", "image_ids": ["9"],
                       "entities": ["A dog", "the snow"]}
    assert [r["caption_id"] for r in rows] == ["train-1", "train-2", "train-3", "0", "1", "2"]
    assert d.gallery_rows() == [
        {"split": "train", "image_id": "1", "caption_ids": ["train-1", "train-2"]},
        {"split": "train", "image_id": "2", "caption_ids": ["train-3"]},
        {"split": "test", "image_id": "9", "caption_ids": ["0", "1"]},
        {"split": "test", "image_id": "10", "caption_ids": ["2"]},
    ]
    assert d.gallery[0].file == "flickr30k-images/10002456.jpg" and d.gallery[2].file is None
    meta = d.meta()
    assert meta["query_id_type"] == "int" and meta["image_id_type"] == "str"
    assert meta["text_item_id_type"] == "int" and meta["train_image_id_type"] == "int"
    assert restore_id("9", meta["image_id_type"]) == "9" and restore_id("2", meta["query_id_type"]) == 2
    c = d.counts
    assert (c["train_captions"], c["train_images"], c["test_captions"], c["test_images"]) == (3, 2, 3, 2)
    assert c["empty_entities_dropped"] == 1 and c["skipped"] == 0 and d.warnings == []
    assert json.loads(json.dumps(d.report()))["counts"] == c  # JSON-serialisable


def test_explicit_caption_id_blank_lines_bom_crlf(tmp_path):
    p = tmp_path / "train.jsonl"
    body = "\r\n".join([json.dumps({"image": "a.jpg", "caption": "x", "image_id": "a", "segs": [], "caption_id": 77}),
                        "", json.dumps({"image": "b.jpg", "caption": "y", "image_id": "b", "segs": ["y"]})])
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    d = read_agree(train=p)
    assert [c.caption_id for c in d.captions] == ["77", "train-3"]
    assert d.meta() == {"train_caption_id_type": "int", "train_image_id_type": "str"}


LINE_ERRORS = [
    # (file key, bad line content, reason, words)
    ("test_texts", "{not json", "bad_json", "invalid JSON"),
    ("test_texts", "[1, 2]", "not_object", "JSON array"),
    ("test_texts", {"query_id": 5, "item_ids": [9]}, "missing_key", "'query_text'"),
    ("test_texts", {"query_id": 5.5, "query_text": "t", "item_ids": [9]}, "wrong_type", "query_id"),
    ("test_texts", {"query_id": True, "query_text": "t", "item_ids": [9]}, "wrong_type", "query_id"),
    ("test_texts", {"query_id": 5, "query_text": "t", "item_ids": 9}, "wrong_type", "item_ids"),
    ("test_texts", {"query_id": 5, "query_text": "t", "item_ids": []}, "empty_list", "item_ids"),
    ("test_texts", {"query_id": 5, "query_text": "t", "item_ids": [9, "9"]}, "duplicate_in_list", "repeated"),
    ("test_texts", {"query_id": "", "query_text": "t", "item_ids": [9]}, "empty_id", "empty id"),
    ("test_texts", {"query_id": 1, "query_text": "dup", "item_ids": [9]}, "duplicate_id", "first at line 2"),
    ("test_images", {"image_id": "9", "item_ids": [0]}, "duplicate_id", "first at line 1"),
    ("test_entities", {"query_id": 7, "query_text": "t", "items": [1, 2]}, "wrong_type", "items"),
    ("train", {"image": "c.jpg", "caption": "  ", "image_id": 3, "segs": []}, "empty_text", "caption"),
    ("train", {"image": "c.jpg", "caption": "c", "image_id": 3}, "missing_key", "'segs'"),
    ("train", {"image": "other.jpg", "caption": "c", "image_id": 1, "segs": []}, "image_file_conflict", "line 1"),
]


@pytest.mark.parametrize("key,bad,reason,words", LINE_ERRORS)
def test_line_errors_name_file_and_line(tmp_path, key, bad, reason, words):
    rows = {"train": TRAIN, "test_texts": TEXTS, "test_images": IMAGES, "test_entities": ENTS}[key]
    f = files(tmp_path)
    f[key] = jl(tmp_path, f[key].name, list(rows) + [bad])
    bad_line = len(rows) + 1
    with pytest.raises(AgreeFormatError) as ei:
        read_agree(**f)
    e = ei.value
    assert (e.reason, e.line) == (reason, bad_line)
    assert str(e).startswith(f"{f[key]}:{bad_line}: ")
    assert words in str(e)


def test_skip_mode_counts_bad_lines(tmp_path):
    f = files(tmp_path)
    f["train"] = jl(tmp_path, "train.jsonl", TRAIN + ["{oops", {"image": "z.jpg", "caption": "z", "image_id": 5}])
    d = read_agree(**f, on_bad_line="skip")
    assert [(s["file"], s["line"], s["reason"]) for s in d.skipped] == [
        ("train.jsonl", 4, "bad_json"), ("train.jsonl", 5, "missing_key")]
    assert d.counts["train_captions"] == 3 and d.counts["skipped_by_reason"] == {"bad_json": 1, "missing_key": 1}


def test_query_with_unknown_image(tmp_path):
    texts = TEXTS + [{"query_id": 3, "query_text": "q3", "item_ids": [9, 404]},
                     {"query_id": 4, "query_text": "q4", "item_ids": [405]}]
    ents = ENTS + [{"query_id": 3, "query_text": "q3", "items": []}, {"query_id": 4, "query_text": "q4", "items": []}]
    with pytest.raises(AgreeFormatError) as ei:
        read_agree(**files(tmp_path, texts=texts, ents=ents))
    msg = str(ei.value)
    assert ei.value.reason == "unknown_image" and ei.value.line == 4
    assert "test_texts.jsonl:4:" in msg and "test_images.jsonl" in msg
    assert "query 3 (line 4) -> ['404']" in msg and "query 4 (line 5) -> ['405']" in msg and "(2 in all)" in msg


def test_image_with_unknown_caption_and_cascade_in_skip_mode(tmp_path):
    images = [{"image_id": "9", "item_ids": [0, 1, 99]}, {"image_id": "10", "item_ids": [2]}]
    with pytest.raises(AgreeFormatError, match=r"test_images\.jsonl:1: images refer to caption ids absent"):
        read_agree(**files(tmp_path, images=images))
    d = read_agree(**files(tmp_path, images=images), on_bad_line="skip")
    # image 9 goes, then queries 0 and 1 (whose only image is 9) go too: what is left is coherent
    assert [g.image_id for g in d.gallery if g.split == "test"] == ["10"]
    assert [c.caption_id for c in d.captions if c.split == "test"] == ["2"]
    assert sorted((s["reason"], s["id"]) for s in d.skipped) == [
        ("unknown_caption", "9"), ("unknown_image", "0"), ("unknown_image", "1")]


def test_entity_file_consistency(tmp_path):
    ents_extra = ENTS + [{"query_id": 50, "query_text": "nobody", "items": []}]
    with pytest.raises(AgreeFormatError, match=r"test_texts_segs\.jsonl:4: entity rows for query ids absent"):
        read_agree(**files(tmp_path, ents=ents_extra))
    ents_text = [ENTS[0], {**ENTS[1], "query_text": "Something else."}, ENTS[2]]
    with pytest.raises(AgreeFormatError) as ei:
        read_agree(**files(tmp_path, ents=ents_text))
    assert ei.value.reason == "entity_text_mismatch" and ei.value.line == 2 and "query 1" in str(ei.value)
    with pytest.raises(AgreeFormatError, match=r"test_texts\.jsonl:3: queries with no row in test_texts_segs"):
        read_agree(**files(tmp_path, ents=ENTS[:2]))
    d = read_agree(**files(tmp_path, ents=ents_text), on_bad_line="skip")
    # query 1 is dropped; image 9 still needs it, so image 9 and then query 0 go as well
    assert [c.caption_id for c in d.captions if c.split == "test"] == ["2"]
    assert d.counts["skipped_by_reason"] == {"entity_text_mismatch": 1, "unknown_caption": 1, "unknown_image": 1}


def test_without_entities_file(tmp_path):
    f = files(tmp_path)
    d = read_agree(test_texts=f["test_texts"], test_images=f["test_images"])
    assert all(c.entities == [] for c in d.captions) and d.counts["captions_without_entities"] == 3
    with pytest.raises(ValueError, match="together"):
        read_agree(test_texts=f["test_texts"])


def test_asymmetric_ground_truth_is_a_warning(tmp_path):
    images = [{"image_id": "9", "item_ids": [0]}, {"image_id": "10", "item_ids": [1, 2]}]
    d = read_agree(**files(tmp_path, images=images))
    w = {x["reason"]: x for x in d.warnings}
    assert w["gt_asymmetric"]["count"] == 2  # query 1 -> image 9 not mirrored; image 10 -> query 1 not mirrored
    assert {"query_id": "1", "image_id": "9"} in w["gt_asymmetric"]["first"]


def test_train_test_caption_id_collision(tmp_path):
    train = [{"image": "a.jpg", "caption": "x", "image_id": "a", "segs": [], "caption_id": 2}]
    with pytest.raises(AgreeFormatError) as ei:
        read_agree(**files(tmp_path, train=train))
    assert ei.value.reason == "caption_id_collision" and "train.jsonl:1:" in str(ei.value)


def test_mixed_id_types_and_missing_file(tmp_path):
    texts = [TEXTS[0], {**TEXTS[1], "query_id": "1"}, TEXTS[2]]
    d = read_agree(**files(tmp_path, texts=texts))
    assert d.meta()["query_id_type"] == "mixed"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_agree(train=tmp_path / "nope.jsonl")
