"""The demo generator: deterministic bytes, real formats, the ambiguity property, broken images."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo import DemoSpec, _stream, build_pictures, generate_demo
from tests.dvc_project import params_for_tests, params_text

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
TYPES = ("PER", "LOC", "ORG", "MISC")
# the documented contract (DEMO.md): which COCO labels a picture of each type may carry
LABELS_OF_TYPE = {"PER": {"person", "tie"}, "LOC": {"boat", "bench"}, "ORG": {"laptop", "tv", "cell phone"},
                  "MISC": {"sports ball", "kite"}, None: {"cup", "pizza"}}


def project_spec() -> DemoSpec:
    # the committed demo values, not what a `dvc exp run -S demo...` left in the work tree
    return DemoSpec.from_params(params_for_tests()["demo"])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, generate_demo(project_spec(), out)


# ---- independent parsers -------------------------------------------------------------------


def parse_conll(path: Path) -> list[dict]:
    """Blocks of `IMGID:<id>` + `token<TAB>tag` lines; asserts the layout as it goes."""
    tweets: list[dict] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.startswith("IMGID:"):
            tweets.append({"id": line[6:], "tokens": [], "tags": [], "line": lineno})
        elif line:
            token, tag = line.split("\t")  # exactly one tab
            assert token and not token.isspace(), f"{path}:{lineno}: empty token"
            assert re.fullmatch(r"O|[BI]-(PER|LOC|ORG|MISC)", tag), f"{path}:{lineno}: bad tag {tag!r}"
            tweets[-1]["tokens"].append(token)
            tweets[-1]["tags"].append(tag)
    assert all(t["tokens"] for t in tweets)
    return tweets


def chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) entity spans; an I- not continuing its type starts a new one."""
    out: list[list] = []
    for i, g in enumerate(tags):
        if g == "O":
            continue
        if g.startswith("B-") or not out or out[-1][2] != i or out[-1][0] != g[2:]:
            out.append([g[2:], i, i + 1])
        else:
            out[-1][2] = i + 1
    return [tuple(c) for c in out]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


# ---- determinism and atomic writing ----------------------------------------------------------


def test_same_params_give_identical_bytes_and_a_new_seed_changes_them(tmp_path, demo):
    out, _ = demo
    again = generate_demo(project_spec(), tmp_path / "a")
    assert again == demo[1]
    first, second = digests(out), digests(tmp_path / "a")
    assert len(first) > 600 and first == second
    generate_demo(dataclasses.replace(project_spec(), seed=project_spec().seed + 1), tmp_path / "b")
    other = digests(tmp_path / "b")
    for rel in ("tweets/train.txt", "tweets/boxes.jsonl", "flickr/train.jsonl", "flickr/test_texts.jsonl"):
        assert other[rel] != first[rel], rel
    assert set(first) != set(other)  # image ids (file names) change with the seed too


def test_mner_bytes_do_not_depend_on_retrieval_params(tmp_path, demo):
    spec = project_spec()
    changed = dataclasses.replace(spec, retrieval=dataclasses.replace(spec.retrieval, train_images=7, test_images=5))
    generate_demo(changed, tmp_path / "x")
    a = {k: v for k, v in digests(demo[0]).items() if k.startswith("tweets/")}
    b = {k: v for k, v in digests(tmp_path / "x").items() if k.startswith("tweets/")}
    assert a == b
    assert len(read_jsonl(tmp_path / "x" / "flickr" / "test_images.jsonl")) == 5


def test_stage_writes_the_project_params_demo_and_replaces_old_content(tmp_path, monkeypatch, demo):
    from stages.demo import main

    root = tmp_path / "root"  # the project's dvc.yaml and committed params values (see tests/dvc_project.py)
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(params_text()[0], encoding="utf-8")
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    out = tmp_path / "data" / "demo"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older run")
    main(["--out", str(out)])
    assert digests(out) == digests(demo[0])
    assert [p.name for p in out.parent.iterdir()] == ["demo"]  # no temp folder left beside it


def test_params_errors_name_the_param():
    p = params_for_tests()["demo"]
    bad = json.loads(json.dumps(p))
    bad["mner"]["train"] = "many"
    with pytest.raises(ValueError, match=r"demo\.mner\.train"):
        DemoSpec.from_params(bad)
    bad = json.loads(json.dumps(p))
    bad["mner"]["ambiguous_share"] = 1.0
    with pytest.raises(ValueError, match=r"demo\.mner\.ambiguous_share"):
        DemoSpec.from_params(bad)
    bad = json.loads(json.dumps(p))
    del bad["retrieval"]["captions_per_image"]
    with pytest.raises(ValueError, match=r"demo\.retrieval\.captions_per_image: missing"):
        DemoSpec.from_params(bad)


# ---- MNER files ------------------------------------------------------------------------------


def test_tweet_files_are_twitter2017_conll_with_the_traps(demo):
    out, _ = demo
    spec = project_spec()
    tw = {s: parse_conll(out / "tweets" / f"{s}.txt") for s in SPLITS}
    assert [len(tw[s]) for s in SPLITS] == [spec.mner.train, spec.mner.valid, spec.mner.test]
    ids = [t["id"] for s in SPLITS for t in tw[s]]
    assert len(set(ids)) == len(ids)
    raw = {s: (out / "tweets" / f"{s}.txt").read_text(encoding="utf-8") for s in SPLITS}
    assert not raw["train"].endswith("\n\n") and raw["train"].endswith("\n")
    assert raw["valid"].endswith("\n\n") and raw["test"].endswith("\n\n")
    tokens = [w for s in SPLITS for t in tw[s] for w in t["tokens"]]
    assert any(w.startswith("@") for w in tokens) and any(w.startswith("http://t.co/") for w in tokens)
    assert "&amp" in tokens or "&amp;" in tokens
    assert any(ord(ch) > 0x2000 for w in tokens for ch in w)  # emoji
    # clean BIO except exactly one train tweet whose entity starts with I-
    stray = {s: [t["id"] for t in tw[s] for i, g in enumerate(t["tags"])
                 if g.startswith("I-") and (i == 0 or t["tags"][i - 1][2:] != g[2:])] for s in SPLITS}
    assert len(stray["train"]) == 1 and stray["valid"] == [] and stray["test"] == []
    assert stray["train"][0] in (out / "DEMO.md").read_text()
    # every type occurs in every split
    for s in SPLITS:
        assert {c[0] for t in tw[s] for c in chunks(t["tags"])} == set(TYPES), s


def test_tweets_parse_with_the_project_reader(demo):
    from pipeline.data.conll import read_conll

    out, _ = demo
    for s in SPLITS:
        res = read_conll(out / "tweets" / f"{s}.txt", fmt="twitter", other_tag="MISC", on_bad_line="raise")
        mine = parse_conll(out / "tweets" / f"{s}.txt")
        theirs = [(x.image_id, x.tokens, x.tags) for x in res.samples]
        assert theirs == [(t["id"], t["tokens"], t["tags"]) for t in mine]
        assert res.counts["stray_i"] == (1 if s == "train" else 0)


def test_the_image_decides_for_ambiguous_names(demo):
    """Same name, same surrounding tokens, different gold types; the pictures' labels differ by type."""
    out, _ = demo
    boxes = {r["image_id"]: set(r["labels"]) for r in read_jsonl(out / "tweets" / "boxes.jsonl")}
    types_of: dict[tuple[str, tuple[str, ...]], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s in SPLITS:
        for t in parse_conll(out / "tweets" / f"{s}.txt"):
            spans = chunks(t["tags"])
            # picture content follows the first entity's type (None: no entity)
            if t["id"] in boxes:
                assert boxes[t["id"]] <= LABELS_OF_TYPE[spans[0][0] if spans else None], t["id"]
            if len(spans) != 1:
                continue
            etype, a, b = spans[0]
            pattern = tuple(t["tokens"][:a] + ["<E>"] + t["tokens"][b:])
            types_of[(" ".join(t["tokens"][a:b]), pattern)][etype].append(t["id"])
    pairs = {k: v for k, v in types_of.items() if len(v) >= 2}
    names = {name for name, _ in pairs}
    assert len(names) >= 10, names  # many names, not one lucky coincidence
    assert {"Jordan", "Paris", "Golden State"} <= names
    covered = {t for v in pairs.values() for t in v}
    assert covered == set(TYPES)
    # in each such pair the texts are token-identical and the pictures' labels tell the types apart
    for (_, _), by_type in list(pairs.items())[:50]:
        label_sets = {t: set().union(*[boxes.get(i, set()) for i in ids]) for t, ids in by_type.items()}
        for t1 in label_sets:
            for t2 in label_sets:
                if t1 < t2:
                    assert not (label_sets[t1] & label_sets[t2])


def test_tweet_images_boxes_and_the_intended_missing_and_broken(demo):
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    from pipeline.data.images import ImagePolicy, image_path, load_image

    out, summary = demo
    s = summary["tweets"]
    spec = project_spec()
    assert len(s["missing_images"]) == spec.mner.missing_images and len(s["broken_images"]) == spec.mner.broken_images
    images = out / "tweets" / "images"
    referenced = {t["id"] for sp in SPLITS for t in parse_conll(out / "tweets" / f"{sp}.txt")}
    on_disk = {p.stem for p in images.iterdir()}
    assert set(s["missing_images"]) <= referenced and not (set(s["missing_images"]) & on_disk)
    assert on_disk == referenced - set(s["missing_images"])
    broken = set(s["broken_images"])
    assert sorted(s["broken_images"].values()) == ["not_image", "truncated"]
    coco = set(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    rows = read_jsonl(out / "tweets" / "boxes.jsonl")
    assert [r["image_id"] for r in rows] == sorted(on_disk - broken)
    for r in rows:
        assert set(r) == {"image_id", "boxes", "labels"} and len(r["boxes"]) == len(r["labels"]) >= 1
        assert set(r["labels"]) <= coco
        for x1, y1, x2, y2 in r["boxes"]:
            assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= spec.image_size and 0 <= y1 < y2 <= spec.image_size
    policy = ImagePolicy()
    statuses = {i: load_image(image_path(images, i), policy).status for i in sorted(referenced)}
    expected = {i: "ok" for i in referenced} | {i: "missing" for i in s["missing_images"]} | s["broken_images"]
    assert statuses == expected
    for i in sorted(broken):
        assert not readable(images / f"{i}.jpg")
    with Image.open(images / f"{rows[0]['image_id']}.jpg") as im:
        assert im.format == "JPEG" and im.size == (spec.image_size, spec.image_size) and not im.info.get("exif")


# ---- retrieval files -------------------------------------------------------------------------


def test_retrieval_files_are_agree_and_consistent(demo):
    out, summary = demo
    spec = project_spec().retrieval
    d = out / "flickr"
    train, texts = read_jsonl(d / "train.jsonl"), read_jsonl(d / "test_texts.jsonl")
    images, segs = read_jsonl(d / "test_images.jsonl"), read_jsonl(d / "test_texts_segs.jsonl")
    assert all(list(r) == ["image", "caption", "image_id", "segs"] for r in train)
    assert all(list(r) == ["query_id", "query_text", "item_ids"] for r in texts)
    assert all(list(r) == ["image_id", "item_ids"] for r in images)
    assert all(list(r) == ["query_id", "query_text", "items"] for r in segs)
    assert all(type(r["image_id"]) is int and r["image"] == f"images/{r['image_id']}.jpg" for r in train)
    train_ids = {r["image_id"] for r in train}
    test_ids = [r["image_id"] for r in images]
    assert len(train_ids) == spec.train_images and len(set(test_ids)) == len(test_ids) == spec.test_images
    assert not train_ids & set(test_ids)
    assert len(train) == spec.train_images * spec.captions_per_image
    assert len(texts) == spec.test_images * spec.captions_per_image
    # the two test files point at each other, one image per query
    owner = {q: r["image_id"] for r in images for q in r["item_ids"]}
    assert sorted(owner) == [r["query_id"] for r in texts] == list(range(len(texts)))
    assert all(r["item_ids"] == [owner[r["query_id"]]] for r in texts)
    assert [(r["query_id"], r["query_text"]) for r in segs] == [(r["query_id"], r["query_text"]) for r in texts]
    # entities: 1-3 per caption, each verbatim exactly once, so a plain replace masks it
    for text, ents in [(r["caption"], r["segs"]) for r in train] + [(r["query_text"], r["items"]) for r in segs]:
        assert 1 <= len(ents) <= 3 and len(set(ents)) == len(ents)
        for e in ents:
            assert text.count(e) == 1, (text, e)
            assert "[MASK]" in text.replace(e, "[MASK]")
    # captions of one image differ
    by_image = defaultdict(list)
    for r in train:
        by_image[r["image_id"]].append(r["caption"])
    assert all(len(set(v)) == len(v) for v in by_image.values())
    # images: intended missing / broken, boxes for the readable rest
    s = summary["flickr"]
    all_ids = {str(i) for i in train_ids | set(test_ids)}
    on_disk = {p.stem for p in (d / "images").iterdir()}
    assert len(s["missing_images"]) == spec.missing_images and len(s["broken_images"]) == spec.broken_images
    assert on_disk == all_ids - set(s["missing_images"])
    assert all(not readable(d / "images" / f"{i}.jpg") for i in s["broken_images"])
    ok = sorted(on_disk - set(s["broken_images"]), key=int)
    assert all(readable(d / "images" / f"{i}.jpg") for i in ok)
    assert [r["image_id"] for r in read_jsonl(d / "boxes.jsonl")] == ok


def test_retrieval_distractors_share_objects(demo):
    out, _ = demo
    spec = project_spec()
    pics = build_pictures(spec, _stream(spec.seed, 2))
    for split in ("train", "test"):
        group = [p for p in pics if p.split == split]
        keys = [(p.scene, frozenset(p.objects)) for p in group]
        assert len(set(keys)) == len(keys)  # every image is identifiable
        sharing = [p for p in group if any(set(p.objects) & set(q.objects) for q in group if q is not p)]
        assert len(sharing) >= 0.9 * len(group), split
    # in the files: for most test queries, one of their entities is also mentioned for another image
    segs = read_jsonl(out / "flickr" / "test_texts_segs.jsonl")
    owner = {q: r["image_id"] for r in read_jsonl(out / "flickr" / "test_images.jsonl") for q in r["item_ids"]}
    mentioned = defaultdict(set)
    for r in segs:
        for e in r["items"]:
            mentioned[e].add(owner[r["query_id"]])
    shared = [r for r in segs if any(len(mentioned[e]) > 1 for e in r["items"])]
    assert len(shared) >= 0.5 * len(segs)


def test_retrieval_files_parse_with_the_project_reader(demo):
    from pipeline.data.agree import read_agree

    out, _ = demo
    d = out / "flickr"
    data = read_agree(d / "train.jsonl", d / "test_texts.jsonl", d / "test_images.jsonl",
                      d / "test_texts_segs.jsonl", on_bad_line="raise")
    spec = project_spec().retrieval
    assert data.skipped == [] and data.warnings == []
    assert data.counts["test_captions"] == spec.test_images * spec.captions_per_image
    assert data.meta()["query_id_type"] == "int" and data.meta()["image_id_type"] == "int"
    test_entities = {c.caption_id: c.entities for c in data.captions if c.split == "test"}
    assert test_entities == {str(r["query_id"]): r["items"] for r in read_jsonl(d / "test_texts_segs.jsonl")}
