"""Storage precision (shards.dtype) and the bf16 image tower (clip.precision).

Expectations are independent of the code under test: hand-worked roundings of known values,
numpy's float16 cast and torch's bfloat16 cast for many values, real HDF5 files and the real
extraction stages on a tiny generated project.
"""
import json

import h5py
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import pipeline.encoders.clip as clip_mod
from pipeline.artifacts import write_parquet
from pipeline.encoders.clip import encode_images, load_clip, resolve_precision
from pipeline.extract.images import extract_patches, extract_regions
from pipeline.params import Params
from pipeline.stores.inspect import check, summary
from pipeline.stores.shards import (
    ENCODING_ATTR,
    CorruptShardError,
    ShardReader,
    StorageOverflowError,
    decode_storage,
    encode_storage,
    from_bfloat16_bits,
    shard_status,
    to_bfloat16_bits,
    verify_shard,
    write_shard,
)

torch.set_num_threads(1)
TINY = "demo-tiny-vit"

# value -> (float16, bfloat16), worked by hand: float16 keeps 10 fraction bits, bfloat16 7, ties to even.
# 0.1 = 1.6 * 2^-4: 1.6 * 1024 = 1638.4 -> 1638; 1.6 * 128 = 204.8 -> 205
# 1/3 = 1.333.. * 2^-2: 1365.33 -> 1365; 170.67 -> 171
# 1 + 2^-8: exact in float16; in bfloat16 halfway between 1 and 1 + 2^-7 -> the even one, 1
# 1 + 3 * 2^-8: exact in float16; halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even) -> 1 + 2^-6
# 65504: float16's largest; bfloat16 (8 significant bits): 65504 = 1.9990234375 * 2^15 -> 2 * 2^15
KNOWN = {
    0.1: (1638 / 1024 / 16, 205 / 128 / 16),
    1 / 3: (1365 / 1024 / 4, 171 / 128 / 4),
    1 + 2 ** -8: (1 + 2 ** -8, 1.0),
    1 + 3 * 2 ** -8: (1 + 3 * 2 ** -8, 1 + 2 ** -6),
    -2.0: (-2.0, -2.0),
    65504.0: (65504.0, 65536.0),
}


def values() -> np.ndarray:
    """(6, 8) float32: the known values first, then normal random values of several scales."""
    rng = np.random.default_rng(7)
    known = np.array(list(KNOWN), dtype=np.float32)
    rest = (rng.standard_normal(48 - len(known)) * np.repeat([1e-3, 1.0, 30.0, 1e3], 11)[:48 - len(known)])
    return np.concatenate([known, rest.astype(np.float32)]).reshape(6, 8)


# ---- the encodings ----------------------------------------------------------------------------------

def test_known_values_round_as_worked_by_hand():
    a = np.array(list(KNOWN), dtype=np.float32)
    f16, _ = encode_storage(a, "float16")
    bits, enc = encode_storage(a, "bfloat16")
    assert f16.dtype == np.float16 and enc == "bfloat16" and bits.dtype == np.uint16
    assert f16.astype(np.float64).tolist() == [v[0] for v in KNOWN.values()]
    assert from_bfloat16_bits(bits).astype(np.float64).tolist() == [v[1] for v in KNOWN.values()]
    assert to_bfloat16_bits(np.array([1.0, -2.0], np.float32)).tolist() == [0x3F80, 0xC000]  # sign, exponent, 7 bits


def test_bfloat16_bits_match_torch_and_float16_matches_numpy_and_torch():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(5000) * s for s in (1e-30, 1e-4, 1.0, 1e4, 1e30)]).astype(np.float32)
    a = np.concatenate([a, np.float32([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38])])
    want = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(a), want)  # every bit, inf and overflow to inf included
    np.testing.assert_array_equal(from_bfloat16_bits(want), torch.from_numpy(want.view(np.int16)).view(torch.bfloat16)
                                  .float().numpy())
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.float32([np.nan, -np.nan])))).all()
    mid = a[np.abs(a) < 6e4]
    f16, enc = encode_storage(mid, "float16")
    assert enc is None
    np.testing.assert_array_equal(f16, torch.from_numpy(mid).half().numpy())
    np.testing.assert_array_equal(decode_storage(f16, None), mid.astype(np.float16).astype(np.float32))
    assert decode_storage(f16, None).dtype == np.float32


def test_float16_overflow_is_refused_not_turned_into_inf():
    with pytest.raises(StorageOverflowError, match=r"1 finite value\(s\) beyond float16's range.*100000"):
        encode_storage(np.float32([1.0, 1e5]), "float16", "patch_tokens")
    assert from_bfloat16_bits(encode_storage(np.float32([1e5]), "bfloat16")[0]).tolist() == [99840.0]
    with pytest.raises(ValueError, match="float arrays only"):
        encode_storage(np.arange(3), "float16", "labels")
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        encode_storage(np.zeros(2, np.float32), "float8")


# ---- shards in each dtype ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_digests_and_reader_per_dtype(tmp_path, dtype):
    tokens = values().reshape(3, 2, 8)  # 3 items
    pooled = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    expect = {"float32": tokens,
              "float16": tokens.astype(np.float16).astype(np.float32),                 # numpy's rounding
              "bfloat16": torch.from_numpy(tokens).bfloat16().float().numpy()}[dtype]  # torch's rounding
    path = tmp_path / "shard-00000.h5"
    write_shard(path, ["a", "b", "c"], {"pooled": pooled, "patch_tokens": tokens}, {"m": 1}, "fp",
                dtypes={"pooled": "float32", "patch_tokens": dtype})
    with h5py.File(path) as f:
        stored = f["patch_tokens"]
        assert stored.dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
        assert stored.attrs.get(ENCODING_ATTR) == ("bfloat16" if dtype == "bfloat16" else None)
        assert stored.fletcher32 and f["pooled"].dtype == np.float32
    assert verify_shard(path) == [] and shard_status(path, "fp") == ("done", "")
    r = ShardReader(tmp_path)
    assert r.stored_dtypes["patch_tokens"] == dtype and r.stored_dtypes["pooled"] == "float32"
    assert r.datasets["patch_tokens"] == ((2, 8), np.dtype("float32"))  # float32 to readers by default
    np.testing.assert_array_equal(r.read_all("patch_tokens"), expect)
    np.testing.assert_array_equal(r.get("b")["patch_tokens"], expect[1])
    assert r.get("b")["patch_tokens"].dtype == np.float32
    np.testing.assert_array_equal(r.read_all("pooled"), pooled)  # pooled exact whatever the token dtype
    raw = ShardReader(tmp_path, raw=True).get("c")["patch_tokens"]
    assert raw.dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    assert "patch_tokens" in summary(tmp_path) and check(tmp_path) == []
    shown = "bfloat16 (stored as uint16 bits)" if dtype == "bfloat16" else dtype
    assert any("patch_tokens" in line and shown in line for line in summary(tmp_path).splitlines())


def test_bfloat16_attribute_and_bytes_are_covered_by_the_digest(tmp_path):
    path = tmp_path / "shard-00000.h5"
    write_shard(path, ["a", "b", "c"], {"t": values()[:3]}, {}, "fp", dtypes={"t": "bfloat16"})
    with h5py.File(path, "a") as f:  # drop the attribute: the same bytes would read as integers
        del f["t"].attrs[ENCODING_ATTR]
    assert shard_status(path, "fp")[0] == "failed"
    assert any("'t'" in p and "digest" in p for p in verify_shard(path))
    write_shard(path, ["a", "b", "c"], {"t": values()[:3]}, {}, "fp", dtypes={"t": "bfloat16"})
    with h5py.File(path, "a") as f:
        f["t"].attrs[ENCODING_ATTR] = "float8"
    assert any("unknown storage encoding 'float8'" in p for p in verify_shard(path))
    with pytest.raises(CorruptShardError, match="unknown storage encoding"):
        ShardReader(tmp_path)
    nan = values()[:3].copy()
    nan[1, 2] = np.nan
    write_shard(path, ["a", "b", "c"], {"t": nan}, {}, "fp", dtypes={"t": "bfloat16"})
    assert any("1 item(s) with NaN/inf: 'b'" in p for p in check(tmp_path))  # --check sees decoded values


# ---- the extraction stages -----------------------------------------------------------------------------

IMAGES = ["a", "b", "c", "d", "e"]
PARAMS = {
    "datasets": {"ds": {"kind": "mner", "format": "twitter", "dir": "data/ds", "images": "images",
                        "annotations": "boxes.jsonl", "other_tag": "MISC"}},
    "images": {"fallback": "blank", "max_pixels": 89478485, "min_side": 4},
    "shards": {"size": 2, "dtype": "float32"},
    "clip": {"model": TINY, "checkpoint": "random-init", "trusted_torchscript": False, "batch_size": 2,
             "workers": 0, "device": "cpu", "threads": 1, "precision": "fp32"},
    "detector": {"source": "annotations", "arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "checkpoint": "random-init",
                 "score_thresh": 0.0, "nms_iou": 0.7, "topk": 2, "crop_batch_size": 3},
}
DECLARED = {"patches": ["datasets.ds", "images", "shards", "clip"],
            "regions": ["datasets.ds", "images", "shards", "clip", "detector"]}


def params(stage, dtype="float32", precision="fp32"):
    data = json.loads(json.dumps(PARAMS))
    data["shards"]["dtype"], data["clip"]["precision"] = dtype, precision
    return Params(data, DECLARED[stage], stage)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Five random 48x40 JPEGs, their prepared manifest and one annotated box each."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    (tmp_path / "data/ds/images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows, boxes = [], []
    for i in IMAGES:
        rel = f"data/ds/images/{i}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(tmp_path / rel, quality=90)
        rows.append({"image_id": i, "path": rel, "status": "ok", "is_fallback": False})
        boxes.append({"image_id": i, "boxes": [[4, 4, 30, 30]], "labels": ["person"]})
    write_parquet(pa.Table.from_pylist(rows), tmp_path / "data/prepared/ds/images.parquet", {"test": True})
    (tmp_path / "data/ds/boxes.jsonl").write_text("".join(json.dumps(b) + "\n" for b in boxes))
    return tmp_path


def test_storage_dtype_is_fingerprinted_and_pooled_stays_float32(project):
    out = project / "features/ds/patches"
    runs, pooled, tokens = {}, {}, {}
    for dt in ("float32", "float16", "bfloat16", "float32"):
        runs[dt] = extract_patches("ds", params("patches", dt))
        assert runs[dt]["shards_written"] == 3  # a changed dtype rewrites every shard
        with ShardReader(out) as r:
            assert r.provenance["storage"] == {"patch_tokens": dt, "pooled": "float32"} == runs[dt]["storage"]
            assert r.stored_dtypes["pooled"] == "float32" and r.stored_dtypes["patch_tokens"] == dt
            pooled[dt], tokens[dt] = r.read_all("pooled"), r.read_all("patch_tokens")
    assert len({runs[dt]["fingerprint"] for dt in runs}) == 3
    assert extract_patches("ds", params("patches", "float32"))["shards_written"] == 0
    for dt in ("float16", "bfloat16"):  # the retrieval embeddings do not depend on the storage dtype
        np.testing.assert_array_equal(pooled[dt], pooled["float32"])
        assert pooled[dt].dtype == np.float32
    np.testing.assert_array_equal(tokens["float16"], tokens["float32"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(tokens["bfloat16"], torch.from_numpy(tokens["float32"]).bfloat16().float().numpy())
    reg = {dt: extract_regions("ds", params("regions", dt)) for dt in ("float32", "bfloat16")}
    assert reg["float32"]["fingerprint"] != reg["bfloat16"]["fingerprint"]
    with ShardReader(project / "features/ds/regions") as r:
        assert r.stored_dtypes["feats"] == "bfloat16" and r.stored_dtypes["boxes"] == "float32"
        assert r.datasets["feats"][1] == np.dtype("float32") and r.get("a")["mask"].tolist() == [True, False]


def test_precision_is_fingerprinted_and_a_cpu_without_bf16_falls_back_counted(project, monkeypatch, capsys):
    fp32 = extract_patches("ds", params("patches"))
    with ShardReader(project / "features/ds/patches") as r:
        ref = r.read_all("patch_tokens")
    monkeypatch.setattr(clip_mod, "cpu_flags", lambda path="/proc/cpuinfo": {"avx512f", "fma"})
    fell = extract_patches("ds", params("patches", precision="bf16"))
    assert "clip.precision: bf16 requested, running fp32" in capsys.readouterr().err
    assert fell["precision"]["used"] == "fp32" and fell["precision_fallbacks"] == 1
    assert fell["fingerprint"] == fp32["fingerprint"] and fell["shards_skipped"] == 3  # what ran is what counts
    monkeypatch.setattr(clip_mod, "cpu_flags", lambda path="/proc/cpuinfo": {"avx512f", "avx512_bf16"})
    bf = extract_patches("ds", params("patches", precision="bf16"))
    assert bf["precision"] == {"requested": "bf16", "used": "bf16", "cpu_flags": ["avx512_bf16"]}
    assert bf["fingerprint"] != fp32["fingerprint"] and bf["shards_written"] == 3 and bf["precision_fallbacks"] == 0
    with ShardReader(project / "features/ds/patches") as r:
        assert r.provenance["precision"]["used"] == "bf16"
        got = r.read_all("patch_tokens")
    assert not np.array_equal(got, ref)
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99  # the same features, to bfloat16 precision
    reg = [extract_regions("ds", params("regions", precision=p))["fingerprint"] for p in ("fp32", "bf16")]
    assert reg[0] != reg[1]


def test_bf16_image_tower_matches_fp32_and_tells_what_ran():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, set()) == {"requested": "fp32", "used": "fp32"}
    assert resolve_precision("bf16", cpu, {"amx_bf16"})["used"] == "bf16"
    assert resolve_precision("bf16", cpu, {"bf16", "asimd"})["used"] == "bf16"  # Arm's Features name
    assert "no bfloat16 instructions" in resolve_precision("bf16", cpu, {"avx2"})["fallback"]
    if resolve_precision("bf16", cpu)["used"] != "bf16":
        pytest.skip("this CPU has no bfloat16 instructions")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    p32, t32 = encode_images(load_clip(PARAMS["clip"]), x)
    b = load_clip({**PARAMS["clip"], "precision": "bf16"})
    pb, tb = encode_images(b, x)
    assert b.precision_used == "bf16" and pb.dtype == tb.dtype == torch.float32
    assert not torch.equal(tb, t32)
    assert torch.nn.functional.cosine_similarity(tb, t32, dim=-1).min() > 0.999
    assert torch.nn.functional.cosine_similarity(pb, p32, dim=-1).min() > 0.999
    assert torch.equal(b.model.visual(x)[0].float(), pb)  # calling the tower directly runs the same way


def test_text_only_load_says_nothing_about_the_image_tower_and_text_is_fp32_either_way(monkeypatch, capsys):
    from pipeline.encoders.clip import encode_texts

    bf16 = {**PARAMS["clip"], "precision": "bf16"}
    texts = ["a photo of a dog", "Obama in Paris", ""]
    monkeypatch.setattr(clip_mod, "cpu_flags", lambda path="/proc/cpuinfo": {"avx512f", "fma"})  # no bfloat16
    image = load_clip(bf16)
    assert "clip.precision: bf16 requested, running fp32" in capsys.readouterr().err  # the image stages are told
    text = load_clip(bf16, image_tower=False)
    assert capsys.readouterr().err == ""  # the captions stage is not: it has no image tower to run in bf16
    assert text.precision == {"requested": "bf16", "used": "fp32"} and image.precision["used"] == "fp32"
    with pytest.raises(clip_mod.ClipLoadError, match="clip.precision"):
        load_clip({**PARAMS["clip"], "precision": "fp16"}, image_tower=False)  # still checked
    # the text tower never runs under the bf16 autocast: with a bf16 image tower its embeddings are bit-identical
    monkeypatch.setattr(clip_mod, "cpu_flags", lambda path="/proc/cpuinfo": {"avx512_bf16"})
    fp32, b = load_clip(PARAMS["clip"]), load_clip(bf16)
    assert b.precision_used == "bf16"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(encode_images(b, x)[0], encode_images(fp32, x)[0])  # the image tower did change
    assert torch.equal(encode_texts(b, texts), encode_texts(fp32, texts))
    assert torch.equal(encode_texts(text, texts), encode_texts(fp32, texts))


def test_detector_bench_compares_boxes_and_region_features_as_worked_by_hand():
    from bench.extract import region_agreement

    def run(boxes1: list[float], feat1: list[float]) -> dict[str, np.ndarray]:
        """Two images, K = 2 slots, D = 2: image 0 fixed, image 1 given; slot 1 empty in both."""
        return {"boxes": np.array([[[0, 0, 0.5, 0.5], [0] * 4], [boxes1, [0] * 4]], np.float32),
                "labels": np.array([[1, 0], [3, 0]]), "mask": np.array([[True, False], [True, False]]),
                "feats": np.array([[[1, 2], [0, 0]], [feat1, [0, 0]]], np.float32)}

    # image 1 (20 wide, 10 high): the box moves right by 0.1 x 20 = 2 pixels (> 1: it differs);
    # IoU of x 0.1-0.6 vs 0.2-0.7, y 0.1-0.6 both: 0.4 x 0.5 / (0.25 + 0.25 - 0.2) = 2/3
    got = region_agreement(run([0.1, 0.1, 0.6, 0.6], [1, 0]), run([0.2, 0.1, 0.7, 0.6], [0, 1]), [(10, 20)] * 2)
    assert got["boxes_differ_share"] == 0.5 and got["boxes_bit_identical_share"] == 0.5
    assert got["max_corner_shift_px_same_slots"] == pytest.approx(2.0, abs=1e-4)  # same labels and masks, moved
    assert got["best_iou_to_fp32_box"]["mean"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-4)
    assert got["best_iou_to_fp32_box"]["min"] == pytest.approx(2 / 3, abs=1e-4)
    assert got["cosine_per_image"] == {"mean": 0.5, "min": 0.0} and got["cosine_per_region_min"] == 0.0
    same = run([0.1, 0.1, 0.6, 0.6], [1, 0])
    assert region_agreement(same, same, [(10, 20)] * 2)["boxes_differ_share"] == 0.0
