"""prepare: raw files -> manifests, with image statuses counted and escapes refused."""
import json
from types import MappingProxyType

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.artifacts import read_parquet_provenance
from pipeline.data.prepare import prepare_dataset

IMAGES = {"fallback": "blank", "max_pixels": 10_000_000, "min_side": 4}


def _tweets(path, blocks):
    path.write_text("\n\n".join(blocks), encoding="utf-8")  # no trailing blank line, like Twitter-2015


@pytest.fixture
def mner_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    d = tmp_path / "data" / "tw"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(d / "images" / "1.jpg")
    Image.new("L", (16, 16), 7).save(d / "images" / "2.jpg")
    (d / "images" / "3.jpg").write_bytes(b"")
    _tweets(d / "train.txt", ["IMGID:1\nJordan\tB-PER\nwins\tO", "IMGID:2\nin\tO\nParis\tB-OTHER"])
    _tweets(d / "valid.txt", ["IMGID:3\nApple\tI-ORG\nrocks\tO"])
    _tweets(d / "test.txt", ["IMGID:4\nhi\tO", "IMGID:../../secret\nx\tO"])
    return tmp_path, {"kind": "mner", "format": "twitter", "dir": "data/tw", "images": "images",
                      "splits": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
                      "other_tag": "MISC", "on_bad_line": "raise"}


def test_prepare_mner_manifests(mner_dir):
    root, ds = mner_dir
    report = prepare_dataset("tw", ds, IMAGES, "data/prepared/tw")
    out = root / "data/prepared/tw"
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert [s["sample_id"] for s in samples] == ["train-000000", "train-000001", "valid-000000", "test-000000", "test-000001"]
    assert samples[1]["tags"] == ["O", "B-MISC"]          # OTHER normalised
    assert samples[2]["tags"] == ["I-ORG", "O"]           # stray I- kept as data
    assert samples[1]["line"] == 5
    images = {r["image_id"]: r for r in pq.read_table(out / "images.parquet").to_pylist()}
    assert images["1"]["status"] == "ok" and images["1"]["path"] == "data/tw/images/1.jpg"
    assert images["2"]["status"] == "converted_L" and not images["2"]["is_fallback"]
    assert images["3"]["status"] == "zero_byte" and images["3"]["is_fallback"]
    assert images["4"]["status"] == "missing"
    assert images["../../secret"]["status"] == "refused" and images["../../secret"]["path"] == ""
    assert report["images"]["fallbacks"] == 3
    assert report["images"]["counts"] == {"converted_L": 1, "missing": 1, "ok": 1, "refused": 1, "zero_byte": 1}
    assert report["has_images"] is True and report["blank_tokens"] == 0
    prov = read_parquet_provenance(out / "samples.parquet")
    assert prov["dataset"] == "tw" and len(prov["fingerprint"]) == 64


def test_prepare_is_deterministic(mner_dir):
    root, ds = mner_dir
    assert prepare_dataset("tw", ds, IMAGES, "a") == prepare_dataset("tw", ds, IMAGES, "b")
    for name in ("samples.parquet", "images.parquet"):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes(), name


def test_a_changed_image_changes_the_manifest(mner_dir):
    """The image stages depend on images.parquet, not on the raw folder: its sha256 column must
    follow each image's bytes (hashlib over the file, worked out here independently)."""
    import hashlib

    root, ds = mner_dir
    prepare_dataset("tw", ds, IMAGES, "a")
    rows = {r["image_id"]: r for r in pq.read_table(root / "a/images.parquet").to_pylist()}
    img1 = root / "data/tw/images/1.jpg"
    assert rows["1"]["sha256"] == hashlib.sha256(img1.read_bytes()).hexdigest()
    assert rows["4"]["sha256"] == "" and rows["../../secret"]["sha256"] == ""  # missing, refused
    Image.new("RGB", (16, 16), (0, 0, 255)).save(img1)  # same size and status, other pixels
    prepare_dataset("tw", ds, IMAGES, "b")
    after = {r["image_id"]: r for r in pq.read_table(root / "b/images.parquet").to_pylist()}
    assert after["1"]["status"] == rows["1"]["status"] and after["1"]["sha256"] != rows["1"]["sha256"]
    assert after["2"]["sha256"] == rows["2"]["sha256"]
    assert (root / "a/images.parquet").read_bytes() != (root / "b/images.parquet").read_bytes()


def test_overrides_stay_out_of_the_prepared_manifests(mner_dir):
    root, ds = mner_dir
    prepare_dataset("tw", ds, IMAGES, "a")
    prepare_dataset("tw", {**ds, "overrides": {"train": {"epochs": 3}}}, IMAGES, "b")
    for name in ("samples.parquet", "images.parquet"):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes(), name


def test_prepare_retrieval_manifests(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    d = tmp_path / "fl"
    (d / "images").mkdir(parents=True)
    for i in ("10", "11", "20", "21"):
        Image.new("RGB", (8, 8)).save(d / "images" / f"{i}.jpg")

    def jl(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jl("train.jsonl", [{"image": "images/10.jpg", "caption": "a red car", "image_id": 10, "segs": ["a red car"]},
                       {"image": "images/11.jpg", "caption": "a dog", "image_id": 11, "segs": ["a dog"]}])
    jl("t.jsonl", [{"query_id": 1, "query_text": "a man and a dog", "item_ids": [20]},
                   {"query_id": 2, "query_text": "a tree", "item_ids": [21]}])
    jl("i.jsonl", [{"image_id": 20, "item_ids": [1]}, {"image_id": 21, "item_ids": [2]}])
    jl("e.jsonl", [{"query_id": 1, "query_text": "a man and a dog", "items": ["a man", "a dog"]},
                   {"query_id": 2, "query_text": "a tree", "items": ["a tree"]}])
    ds = {"kind": "retrieval", "format": "agree", "dir": "fl", "images": "images", "train": "train.jsonl",
          "test_texts": "t.jsonl", "test_images": "i.jsonl", "test_entities": "e.jsonl", "on_bad_line": "raise"}
    prepare_dataset("fl", ds, IMAGES, "out")
    caps = pq.read_table(tmp_path / "out/captions.parquet").to_pylist()
    test = [c for c in caps if c["split"] == "test"]
    assert [(c["caption_id"], c["image_ids"], c["entities"]) for c in test] == [
        ("1", ["20"], ["a man", "a dog"]), ("2", ["21"], ["a tree"])]
    gallery = pq.read_table(tmp_path / "out/gallery.parquet").to_pylist()
    assert {(g["split"], g["image_id"]) for g in gallery} == {("train", "10"), ("train", "11"), ("test", "20"), ("test", "21")}
    images = pq.read_table(tmp_path / "out/images.parquet").to_pylist()
    assert {r["path"] for r in images} == {f"fl/images/{i}.jpg" for i in ("10", "11", "20", "21")}
    assert json.loads((tmp_path / "out/meta.json").read_text())["query_id_type"] == "int"


def test_unknown_kind_names_the_param(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match=r"datasets.x.kind is 'video'"):
        prepare_dataset("x", {"kind": "video"}, IMAGES, "out")


def test_prepare_newsmkg_paths_and_counted_skips(tmp_path, monkeypatch):
    # NewsMKG: IMGID is a path relative to the dataset dir, ".jpg" appended; bad tweets skipped and counted
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    d = tmp_path / "data" / "nm"
    (d / "img" / "2019").mkdir(parents=True)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(d / "img" / "2019" / "a1.jpg")
    _tweets(d / "train.txt", ["IMGID:img/2019/a1\nObama\tB-PER\nspeaks\tO",
                              "IMGID:img/2019/a2\nno tab here",            # malformed: skipped
                              "IMGID:img/2019/a3\nx\tB-FOO"])             # unknown tag: skipped
    _tweets(d / "valid.txt", ["IMGID:img/2019/a1\nhi\tO"])
    _tweets(d / "test.txt", ["IMGID:img/2019/a4\nyo\tO"])
    ds = {"kind": "mner", "format": "newsmkg", "dir": "data/nm", "images": "",
          "splits": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
          "other_tag": "MISC", "on_bad_line": "skip"}
    report = prepare_dataset("nm", ds, IMAGES, "data/prepared/nm")
    out = tmp_path / "data/prepared/nm"
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert [(s["split"], s["image_id"]) for s in samples] == [
        ("train", "img/2019/a1"), ("valid", "img/2019/a1"), ("test", "img/2019/a4")]
    images = {r["image_id"]: r for r in pq.read_table(out / "images.parquet").to_pylist()}
    assert images["img/2019/a1"]["path"] == "data/nm/img/2019/a1.jpg" and images["img/2019/a1"]["status"] == "ok"
    assert images["img/2019/a4"]["status"] == "missing"
    skipped = report["skipped"]["train"]
    assert [s["line"] for s in skipped] == [6, 9]  # the offending lines, not the IMGID lines
    assert [s["reason"] for s in skipped] == ["bad_line", "unknown_tag"]
    assert report["samples"]["train"]["skipped_by_reason"] == {"bad_line": 1, "unknown_tag": 1}


def test_prepare_conll_has_no_images(tmp_path, monkeypatch):
    # format conll (e.g. WNUT-17): text only; no images looked for, images.parquet empty
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    import pipeline.data.prepare as prepare_mod

    def no_images(*a, **k):
        raise AssertionError("conll datasets have no images to load")
    monkeypatch.setattr(prepare_mod, "load_image", no_images)
    d = tmp_path / "data" / "wn"
    d.mkdir(parents=True)
    (d / "train.conll").write_text("-DOCSTART- -X- -X- O\n\n@x\tO\nParis\tB-location\n\t\n"
                                   "\u00a0\tO\nStar Wars\tB-creative-work\n\t\n", encoding="utf-8")
    (d / "dev.conll").write_text("a O\nb B-person", encoding="utf-8")
    (d / "test.conll").write_text("c\tO\n\nd\tB-group\n", encoding="utf-8")
    # a read-only Mapping without images / other_tag / annotations: reading them with [] fails
    splits = MappingProxyType({"train": "train.conll", "valid": "dev.conll", "test": "test.conll"})
    ds = MappingProxyType({"kind": "mner", "format": "conll", "dir": "data/wn", "on_bad_line": "raise", "splits": splits})
    report = prepare_dataset("wn", ds, IMAGES, "data/prepared/wn")
    out = tmp_path / "data/prepared/wn"
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert [(s["split"], s["sample_id"], s["image_id"], s["line"]) for s in samples] == [
        ("train", "train-000000", "", 3), ("train", "train-000001", "", 6),
        ("valid", "valid-000000", "", 1), ("test", "test-000000", "", 1), ("test", "test-000001", "", 3)]
    assert samples[1]["tokens"] == ["\u00a0", "Star Wars"] and samples[1]["tags"] == ["O", "B-creative-work"]
    images = pq.read_table(out / "images.parquet")
    assert images.num_rows == 0 and images.column_names == ["image_id", "path", "status", "is_fallback", "sha256"]
    assert report["has_images"] is False and report["blank_tokens"] == 1
    assert report["images"]["total"] == 0 and report["images"]["fallbacks"] == 0
    sentences = {s: report["samples"][s]["sentences"] for s in ("train", "valid", "test")}
    assert sentences == {"train": 2, "valid": 1, "test": 2}
    assert report["samples"]["train"]["tweets"] == 2


def test_shipped_boxes_key_the_image_manifest(mner_dir):
    root, ds = mner_dir
    boxes = root / "data/tw/boxes.jsonl"
    boxes.write_text('{"image_id": "1", "boxes": []}\n')
    ds = {**ds, "annotations": "boxes.jsonl"}
    prepare_dataset("tw", ds, IMAGES, "a")
    boxes.write_text('{"image_id": "1", "boxes": [[0, 0, 1, 1]]}\n')
    prepare_dataset("tw", ds, IMAGES, "b")
    pa_, pb = (read_parquet_provenance(root / d / "images.parquet") for d in ("a", "b"))
    assert pa_["annotations_sha256"] and pa_["annotations_sha256"] != pb["annotations_sha256"]


# ---- data checks: shared images across splits, empty splits ------------------------------------
def test_an_image_in_two_splits_is_reported_with_counts(mner_dir):
    root, ds = mner_dir
    d = root / "data" / "tw"
    _tweets(d / "valid.txt", ["IMGID:1\nApple\tB-ORG", "IMGID:2\nx\tO"])   # 1 and 2 are train images too
    _tweets(d / "test.txt", ["IMGID:1\nhi\tO", "IMGID:4\nhi\tO"])          # 1 is in all three
    report = prepare_dataset("tw", ds, IMAGES, "out")
    [w] = report["warnings"]
    assert w["reason"] == "image_in_two_splits" and w["count"] == 2 and w["first"] == ["1", "2"]
    assert w["by_splits"] == {"train+valid": 1, "train+valid+test": 1}
    with pytest.raises(ValueError, match=r"datasets.tw: 2 image ids appear in more than one split .*shared_images: raise"):
        prepare_dataset("tw", {**ds, "shared_images": "raise"}, IMAGES, "out2")
    assert not (root / "out2").exists()  # nothing written on refusal


def test_distinct_images_give_no_warning(mner_dir):
    root, ds = mner_dir
    assert prepare_dataset("tw", ds, IMAGES, "out")["warnings"] == []


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_an_empty_split_fails_at_prepare_naming_the_file(mner_dir, split):
    root, ds = mner_dir
    (root / "data" / "tw" / f"{split}.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data/tw/{split}.txt: the {split} split has no sentences.*splits.{split}"):
        prepare_dataset("tw", ds, IMAGES, "out")


def test_a_split_of_only_bad_lines_says_how_many_were_skipped(mner_dir):
    root, ds = mner_dir
    (root / "data" / "tw" / "valid.txt").write_text("IMGID:3\nonly-one-column\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"valid.txt: the valid split has no sentences \(1 skipped as bad lines\)"):
        prepare_dataset("tw", {**ds, "on_bad_line": "skip"}, IMAGES, "out")


def test_an_empty_retrieval_test_file_fails_at_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    d = tmp_path / "fl"
    d.mkdir()
    (d / "t.jsonl").write_text("")
    (d / "i.jsonl").write_text("")
    ds = {"kind": "retrieval", "format": "agree", "dir": "fl", "images": "images", "train": "",
          "test_texts": "t.jsonl", "test_images": "i.jsonl", "test_entities": "", "on_bad_line": "raise"}
    with pytest.raises(ValueError, match=r"fl/t.jsonl: no usable records .*test texts split cannot be empty"):
        prepare_dataset("fl", ds, IMAGES, "out")
