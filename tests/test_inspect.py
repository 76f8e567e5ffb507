"""The inspect command: summary, one item, integrity checks with exit codes, drawing regions."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.artifacts import write_parquet
from pipeline.stores.inspect import PALETTE, check, default_manifest
from pipeline.stores.shards import run_shards, shard_path, write_shard
from pipeline.stores.tables import write_caption_features, write_text_features
from stages.inspect import main

K, D = 4, 8
PROV = {"stage": "regions", "detector": {"source": "annotations", "topk": K}}


def regions(ids):
    """Two valid slots per image (person, dog), two masked-off zero slots."""
    n = len(ids)
    mask = np.zeros((n, K), bool)
    mask[:, :2] = True
    boxes = np.zeros((n, K, 4), np.float32)
    boxes[:, 0] = [0.1, 0.1, 0.5, 0.6]
    boxes[:, 1] = [0.4, 0.3, 0.9, 0.95]
    scores = np.zeros((n, K), np.float32)
    scores[:, :2] = [0.9, 0.55]
    labels = np.zeros((n, K), np.int64)
    labels[:, :2] = [1, 18]  # torchvision COCO: 1 person, 18 dog
    feats = np.arange(n * K * D, dtype=np.float32).reshape(n, K, D) / 100
    return {"feats": feats, "boxes": boxes, "labels": labels, "scores": scores, "mask": mask,
            "is_fallback": np.zeros(n, bool)}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with 7 images, their prepared manifest and a regions shard dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_ROOT", raising=False)
    ids = [f"im{i}" for i in range(7)]
    (tmp_path / "data" / "demo" / "images").mkdir(parents=True)
    for i in ids:
        Image.new("RGB", (80, 60), (30, 30, 30)).save(tmp_path / "data" / "demo" / "images" / f"{i}.png")
    write_parquet(pa.table({"image_id": ids, "path": [f"data/demo/images/{i}.png" for i in ids],
                            "status": ["ok"] * 7, "is_fallback": [False] * 7}),
                  tmp_path / "data" / "prepared" / "demo" / "images.parquet", {"stage": "prepare"})
    run_shards(ids, 3, tmp_path / "features" / "demo" / "regions", "fp", PROV, regions)
    return tmp_path


def test_summary_and_item_on_a_good_cache(project, capsys):
    assert main(["features/demo/regions", "--check", "--summary",
                 "--images-manifest", "data/prepared/demo/images.parquet"]) == 0
    out = capsys.readouterr().out
    assert "3 file(s), 7 items" in out
    assert "feats        (7, 4, 8)  float32  chunks (1, 4, 8)" in out
    assert '"topk": 4' in out and "check: ok" in out

    assert main(["features/demo/regions", "--id", "im4"]) == 0
    out = capsys.readouterr().out
    assert "'im4': shard-00001.h5 row 1" in out
    assert "2 valid of 4 slots" in out
    slot1 = next(line for line in out.splitlines() if line.strip().startswith("1    yes"))
    assert "dog" in slot1 and "0.550" in slot1 and "0.950" in slot1

    assert main(["features/demo/regions/shard-00002.h5"]) == 0  # one shard file
    assert "1 items" in capsys.readouterr().out
    assert main(["data/prepared/demo/images.parquet", "--check", "--summary"]) == 0
    assert "7 rows" in capsys.readouterr().out


def test_check_prints_only_its_result_unless_asked(project, capsys):
    assert main(["features/demo/regions", "--check"]) == 0
    out = capsys.readouterr().out
    assert [line.split(" /")[0] for line in out.splitlines()] == [
        "check: against the manifest", "check: ok (features/demo/regions)"], out


def test_check_names_nan_duplicate_and_inconsistent_mask(project, capsys):
    d = project / "features" / "demo" / "regions"
    ids = ["im6", "im0"]  # im0 already in shard 0: a duplicate
    bad = regions(ids)
    bad["feats"][0, 2, 3] = np.nan  # NaN in im6
    bad["boxes"][1, 3] = [0.2, 0.2, 0.3, 0.3]  # im0 (2nd copy): a masked-off slot with a box
    bad["boxes"][0, 1] = [0.8, 0.1, 0.2, 0.5]  # im6: a valid box with x1 > x2
    write_shard(shard_path(d, 2), ids, bad, PROV, "x", run_fingerprint="fp")

    problems = check(d)
    text = "\n".join(problems)
    assert "shard-00002.h5: feats: 1 item(s) with NaN/inf: 'im6'" in text
    assert "id 'im0' appears 2 times: in shard-00000.h5, shard-00002.h5" in text
    assert "1 masked-off slot(s) with non-zero box/score in 1 item(s): 'im0'" in text
    assert "1 valid slot(s) with a box not 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1 in 1 item(s): 'im6'" in text
    assert len(problems) == 4

    assert main([str(d), "--check"]) == 1
    out = capsys.readouterr().out
    assert "check: 4 problem(s)" in out and "'im6'" in out


def test_check_against_the_images_manifest(project, capsys):
    ids = [f"im{i}" for i in range(7)] + ["im7"]
    write_parquet(pa.table({"image_id": ids, "path": [""] * 8}), project / "more.parquet", {})
    write_parquet(pa.table({"image_id": ids[1:7]}), project / "fewer.parquet", {})
    d = "features/demo/regions"
    assert check(d, "data/prepared/demo/images.parquet") == []
    assert check(d, "more.parquet") == ["1 image_id(s) of more.parquet missing from the cache: 'im7'"]
    assert check(d, "fewer.parquet") == ["1 cached id(s) not in fewer.parquet: 'im0'"]
    assert main([d, "--check", "--images-manifest", "more.parquet"]) == 1
    assert "check: 1 problem(s)" in capsys.readouterr().out
    assert main([d, "--check", "--images-manifest", "missing.parquet"]) == 2
    assert "missing.parquet: not found" in capsys.readouterr().err


def test_plain_check_uses_the_prepared_manifest_beside_the_cache(project, capsys, monkeypatch):
    d = "features/demo/regions"
    assert main([d, "--check"]) == 0
    assert "against the manifest" in capsys.readouterr().out
    # one more prepared image than the cache holds: a plain --check must notice
    ids = [f"im{i}" for i in range(8)]
    write_parquet(pa.table({"image_id": ids, "path": [""] * 8}),
                  project / "data" / "prepared" / "demo" / "images.parquet", {"stage": "prepare"})
    assert main([d, "--check"]) == 1
    assert "1 image_id(s) of " in capsys.readouterr().out
    # one shard holds only some of the images: no default manifest for it
    assert main([f"{d}/shard-00002.h5", "--check"]) == 0
    assert "against the manifest" not in capsys.readouterr().out
    assert default_manifest(f"{d}/shard-00002.h5") is None
    # nor for a dir that is not one of the whole caches (aligned holds the test split only)
    (project / "features" / "demo" / "aligned").mkdir()
    assert default_manifest(project / "features" / "demo" / "aligned") is None
    # the manifest is found beside the cache, wherever the command runs from
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert default_manifest(project / d) == project / "data" / "prepared" / "demo" / "images.parquet"


def test_check_reports_temp_files_of_an_interrupted_write(project, capsys):
    d = project / "features" / "demo" / "regions"
    (d / ".shard-00001.h5.12345.tmp").write_bytes(b"half a shard")
    assert main([str(d), "--check"]) == 1
    assert "temporary file(s) of an interrupted write: .shard-00001.h5.12345.tmp" in capsys.readouterr().out


def test_check_damaged_files_and_mixed_runs(project):
    d = project / "features" / "demo" / "regions"
    write_shard(shard_path(d, 1), ["im3", "im4", "im5"], regions(["im3", "im4", "im5"]), PROV, "y",
                run_fingerprint="other-run")
    data = shard_path(d, 2).read_bytes()
    shard_path(d, 2).write_bytes(data[: len(data) // 3])
    shard_path(d, 0).rename(d / "shard-00004.h5")
    text = "\n".join(check(d))
    assert "shard-00002.h5: cannot read" in text
    assert "shard-00004.h5: fingerprint fp differs from shard-00001.h5's other-run" in text
    assert "shard file(s) missing: shard-00000.h5, shard-00003.h5" in text


def test_draw_writes_a_png_of_the_image_size_with_the_boxes(project, capsys):
    assert main(["features/demo/regions", "--draw", "im2", "out/im2.png"]) == 0  # manifest found beside
    assert "drew 2 region(s) of 'im2' on a 80x60 image" in capsys.readouterr().out
    im = Image.open(project / "out" / "im2.png")
    assert im.format == "PNG" and im.size == (80, 60)
    px = np.asarray(im.convert("RGB"))
    # box 0 (person, label 1) outline: left edge x = 0.1 * 80 = 8, from y = 6 to 35; below its label
    assert tuple(px[30, 8]) == PALETTE[1 % len(PALETTE)]
    # box 1 (dog, label 18) right edge x = 0.9 * 80 - 1 = 71
    assert tuple(px[50, 71]) == PALETTE[18 % len(PALETTE)]
    assert tuple(px[2, 2]) == (30, 30, 30)  # outside every box: the image itself
    assert list((project / "out").iterdir()) == [project / "out" / "im2.png"]  # no temp left

    assert main(["features/demo/regions", "--draw", "im2", "big.png", "--min-side", "120",
                 "--images-manifest", "data/prepared/demo/images.parquet"]) == 0
    assert Image.open(project / "big.png").size == (160, 120)


def test_usage_errors_exit_2(project, capsys):
    assert main(["no/such/dir"]) == 2
    assert "no/such/dir: no such file or directory" in capsys.readouterr().err
    assert main(["features/demo/regions", "--id", "zz"]) == 2
    assert "no item with id 'zz'" in capsys.readouterr().err
    run_shards(["a"], 1, project / "features" / "demo" / "patches", "fp", {},
               lambda ids: {"pooled": np.zeros((len(ids), 3), np.float32)})
    assert main(["features/demo/patches", "--draw", "a", "x.png"]) == 2
    assert "not a regions cache" in capsys.readouterr().err
    (project / "empty").mkdir()
    assert main(["empty"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--draw", "a"])
    assert e.value.code == 2


def test_text_and_caption_caches(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [{"sample_id": f"s{i}", "n_words": 3, "feats": rng.standard_normal((3, 1, 4)).astype(np.float32)}
            for i in range(4)]
    write_text_features(tmp_path / "text", rows, {"PER": np.zeros((1, 4))}, {"m": 1})
    write_parquet(pa.table({"sample_id": ["s0", "s1", "s2", "s3", "s4"]}), tmp_path / "samples.parquet", {})
    assert main([str(tmp_path / "text"), "--check", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "feats          (4, 3, 1, 4) float32" in out and "types: PER" in out
    assert main([str(tmp_path / "text"), "--id", "s1"]) == 0
    assert "n_words=3 n_kept=3" in capsys.readouterr().out

    rows[2]["feats"][1, 0, 2] = np.inf
    write_text_features(tmp_path / "text", rows, {"PER": np.zeros((1, 4))}, {"m": 1})
    problems = check(tmp_path / "text", tmp_path / "samples.parquet")
    assert problems == ["words.parquet: feats: 1 row(s) with NaN/inf: 's2'",
                        f"1 sample_id(s) of {tmp_path / 'samples.parquet'} missing from the cache: 's4'"]

    emb = rng.standard_normal((3, 4))
    write_caption_features(tmp_path / "cap", ["a", "b", "c"], emb, np.ones((3, 2, 4)), np.ones((3, 2, 4)), [1, 0, 2], {})
    assert main([str(tmp_path / "cap"), "--check", "--summary"]) == 0
    assert "entities per caption: min 0" in capsys.readouterr().out
    assert main([str(tmp_path / "cap"), "--id", "c"]) == 0
    assert "n_entities=2" in capsys.readouterr().out


def test_module_entry_point_exit_codes(project):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "stages.inspect"]
    good = subprocess.run(run + ["features/demo/regions", "--check"], capture_output=True, text=True, cwd=project, env=env)
    assert good.returncode == 0, good.stderr
    assert "check: ok" in good.stdout
    # a reader that stops early (`inspect ... | head -1`) is not an error
    many = project / "reports_many"  # a summary far larger than a pipe's buffer
    many.mkdir()
    for i in range(200):
        (many / f"r{i:03d}.json").write_text('{"x": "' + "y" * 2000 + '"}')
    piped = subprocess.Popen(run + [str(many)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=project, env=env)
    piped.stdout.readline()
    piped.stdout.close()
    assert piped.wait() == 0 and b"Broken pipe" not in piped.stderr.read()
    bad = subprocess.run(run + ["features/nothing"], capture_output=True, text=True, cwd=project, env=env)
    assert bad.returncode == 2 and "inspect: error: features/nothing: no such file" in bad.stderr


def test_text_summary_names_example_ids(tmp_path, capsys):
    rows = [{"sample_id": f"s{i}", "feats": np.zeros((2, 1, 4), np.float32), "n_words": 2, "n_kept": 2}
            for i in range(8)]
    write_text_features(tmp_path / "text", rows, {"PER": np.zeros((1, 4))}, {"m": 1})
    assert main([str(tmp_path / "text")]) == 0
    assert "ids, e.g.: 's0', 's1', 's2', 's3', 's4', ... (8 in all)" in capsys.readouterr().out


def test_output_folders_and_checkpoints_are_described_and_checked(tmp_path, capsys):
    """An output folder that is not a feature cache (retrieval lists, a model, predictions)
    is listed file by file; its Parquet tables and checkpoints are summarised and checked."""
    import torch

    folder = tmp_path / "retrieval"
    write_parquet(pa.table({"query_id": ["q0", "q1"], "rank": [1, 2]}), folder / "t2i.parquet", {"stage": "retrieve"})
    (folder / "notes.json").write_text('{"k": 2}')
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "2 file(s)" in out and "t2i.parquet" in out and "2 rows" in out and '"k": 2' in out
    assert main([str(folder), "--check"]) == 0
    (folder / "notes.json").write_text("{broken")
    assert main([str(folder), "--check"]) == 1
    assert "notes.json: not valid JSON" in capsys.readouterr().out

    model = tmp_path / "models"
    model.mkdir()
    torch.save({"config": {"hidden": 4}, "tags": ["O", "B-PER"], "meta": {"best_epoch": 3},
                "state_dict": {"enc.w": torch.ones(2, 3), "crf.t": torch.zeros(4)}}, model / "model.pt")
    assert main([str(model)]) == 0
    out = capsys.readouterr().out
    assert "MNER checkpoint, 2 tensors, 10 values" in out and "crf 1, enc 1" in out and '"best_epoch": 3' in out
    assert main([str(model), "--check"]) == 0
    torch.save({"config": {}, "meta": {}, "state_dict": {"enc.w": torch.tensor([1.0, float("nan")])}}, model / "model.pt")
    assert main([str(model / "model.pt"), "--check"]) == 1
    assert "non-finite values in 'enc.w'" in capsys.readouterr().out
    (model / "model.pt").write_bytes(b"not a checkpoint")
    assert main([str(model), "--check"]) == 1
    assert "model.pt: not a readable checkpoint" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "an empty folder; nothing to inspect" in capsys.readouterr().err
