"""The real pipeline under real DVC, in a throwaway git copy of the repository.

One `dvc repro` builds everything from the embedded demo; a second runs nothing; a
change to one params section reruns exactly the stages that declare it.
"""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from tests.dvc_project import copy_project, dvc, stages_run


def _stage_names(project, base):
    """Instance names (`base@item`) of a stage in this project's dvc.yaml, [] if absent."""
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    spec = dvc_yaml["stages"].get(base)
    if spec is None:
        return []
    if "foreach" not in spec:
        return [base]
    ref = spec["foreach"].strip("${} ")
    return [f"{base}@{k}" for k in params[ref]]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = copy_project(tmp_path_factory.mktemp("proj"))
    out = dvc(proj, "repro")
    return proj, out


def test_first_repro_builds_demo_and_manifests(project):
    proj, out = project
    assert {"demo", "prepare@demo_tweets", "prepare@demo_flickr"} <= stages_run(out)
    samples = pq.read_table(proj / "data/prepared/demo_tweets/samples.parquet")
    assert set(samples.column("split").to_pylist()) == {"train", "valid", "test"}
    report = json.loads((proj / "reports/demo_tweets/prepare.json").read_text())
    assert report["images"]["fallbacks"] >= 1  # the demo breaks a few images on purpose
    assert (proj / "data/prepared/demo_flickr/captions.parquet").exists()


def test_first_repro_builds_every_cache_model_and_metric(project):
    proj, out = project
    ran = stages_run(out)
    for stage in ("patches", "regions", "text", "captions", "train", "evaluate", "retrieve", "rerank", "score"):
        assert set(_stage_names(proj, stage)) <= ran, stage
    # the caches are whole and consistent with the prepared manifests
    for ds in ("demo_tweets", "demo_flickr"):
        for cache in ("patches", "regions"):
            p = subprocess.run([sys.executable, "-m", "stages.inspect", f"features/{ds}/{cache}", "--check",
                                "--images-manifest", f"data/prepared/{ds}/images.parquet"],
                               cwd=proj, capture_output=True, text=True)
            assert p.returncode == 0, p.stdout + p.stderr
    mner = json.loads((proj / "metrics/demo_tweets/mner.json").read_text())
    assert set(mner["test"]["per_type"]) == {"PER", "LOC", "ORG", "MISC"}
    # half of the demo's entity names are ambiguous in text: text alone gets about 0.72 F1
    # (README), the full model about 0.96; 0.85 fails if the image branches stop helping
    assert mner["test"]["f1"] > 0.85, mner["test"]
    retrieval = json.loads((proj / "metrics/demo_flickr/retrieval.json").read_text())
    for direction in ("t2i", "i2t"):
        for lst in ("plain", "egr", "tbr", "egr_tbr"):
            r = [retrieval[f"{direction}_{lst}_r{k}"] for k in (1, 5, 10)]
            assert r[0] <= r[1] <= r[2], (direction, lst, r)  # recall@K grows with K
    agree = json.loads((proj / "metrics/demo_flickr/agree/text_output_egr_tbr.json").read_text())
    assert agree["success"] is True and set(agree["scoreJson"]) == {"score", "mean_recall", "r1", "r5", "r10"}


def test_second_repro_runs_nothing(project):
    proj, _ = project
    out = dvc(proj, "repro")
    assert stages_run(out) == set(), out
    status = dvc(proj, "status", "--json")
    assert json.loads(status) == {}, status


def test_fusion_change_reruns_only_train_and_evaluate(project):
    proj, _ = project
    expected = set(_stage_names(proj, "train") + _stage_names(proj, "evaluate"))
    assert expected == {"train@demo_tweets", "evaluate@demo_tweets"}
    out = dvc(proj, "exp", "run", "-S", "fusion.layers=1")
    assert stages_run(out) == expected, out


def test_rerank_change_reruns_only_rerank_and_score(project):
    proj, _ = project
    expected = set(_stage_names(proj, "rerank") + _stage_names(proj, "score"))
    assert expected == {"rerank@demo_flickr", "score@demo_flickr"}
    out = dvc(proj, "exp", "run", "-S", "rerank.top_k=10")
    assert stages_run(out) == expected, out


def test_a_dataset_without_images_runs_no_image_stage(tmp_path):
    """WNUT-17 (plain CoNLL, no images) added to mner_datasets: no patches/regions stage for it,
    and its train/evaluate stages depend on no image stage."""
    proj = copy_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["mner_datasets"] = ["demo_tweets", "wnut17"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = set(dvc(proj, "stage", "list", "--name-only").split())
    assert {"prepare@wnut17", "text@wnut17", "train@wnut17", "evaluate@wnut17"} <= stages, stages
    assert not any(s.startswith(("patches@wnut17", "regions@wnut17")) for s in stages), stages
    assert {"patches@demo_tweets", "regions@demo_tweets"} <= stages  # the image sets still get theirs
    dag = dvc(proj, "dag", "--dot", "evaluate@wnut17")
    assert "text@wnut17" in dag and "patches" not in dag and "regions" not in dag, dag
