"""The real pipeline under real DVC, in a throwaway git copy of the repository.

One `dvc repro` builds everything from the embedded demo; a second runs nothing; a
change to one params section reruns exactly the stages that declare it.
"""
import json
import subprocess
import sys
import warnings

import pyarrow.parquet as pq
import pytest
import yaml

from tests.dvc_project import copy_project, dvc, params_for_tests, stages_run


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
def project(demo_project):
    return demo_project  # tests/conftest.py: the demo built once per session


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
    # the caches are whole and consistent with the prepared manifests; regions only for the
    # MNER image set (nothing in retrieval reads them), patches for both
    assert set(_stage_names(proj, "regions")) == {"regions@demo_tweets"}
    assert set(_stage_names(proj, "patches")) == {"patches@demo_tweets", "patches@demo_flickr"}
    assert not (proj / "features/demo_flickr/regions").exists()
    for ds, cache in (("demo_tweets", "patches"), ("demo_tweets", "regions"), ("demo_flickr", "patches")):
        p = subprocess.run([sys.executable, "-m", "stages.inspect", f"features/{ds}/{cache}", "--check",
                            "--images-manifest", f"data/prepared/{ds}/images.parquet"],
                           cwd=proj, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    # the metrics files hold the headline scores only (a few `dvc exp show` columns); the
    # reports of the same name hold everything
    mner = json.loads((proj / "metrics/demo_tweets/mner.json").read_text())
    assert mner == {"valid": {"f1": mner["valid"]["f1"]},
                    "test": {"f1": mner["test"]["f1"], "per_type": mner["test"]["per_type"]}}
    assert set(mner["test"]["per_type"]) == {"PER", "LOC", "ORG", "MISC"}
    details = json.loads((proj / "reports/demo_tweets/mner.json").read_text())
    assert details["test"]["f1"] == mner["test"]["f1"] and details["model"]["use_image"] is True
    assert details["test"]["per_type"]["LOC"]["f1"] == mner["test"]["per_type"]["LOC"]
    assert details["test"]["per_type"]["PER"]["n_gold"] > 0 and details["test"]["counts"]["sentences"] == 120
    assert set(details["inputs"]) == {"text", "patches", "regions"}  # the caches' fingerprints
    # half of the demo's entity names are ambiguous in text: text alone gets about 0.72 F1
    # (README), the full model about 0.96; 0.85 fails if the image branches stop helping
    assert mner["test"]["f1"] > 0.85, mner["test"]
    retrieval = json.loads((proj / "metrics/demo_flickr/retrieval.json").read_text())
    assert set(retrieval) == {f"{d}_{lst}" for d in ("t2i", "i2t") for lst in ("plain", "egr", "tbr", "egr_tbr")}
    full = json.loads((proj / "reports/demo_flickr/retrieval.json").read_text())
    assert full["queries"] == {"t2i": 300, "i2t": 100} and full["ks"] == [1, 5, 10]
    for direction in ("t2i", "i2t"):
        for lst in ("plain", "egr", "tbr", "egr_tbr"):
            r = [full["recall"][f"{direction}_{lst}_r{k}"] for k in (1, 5, 10)]
            assert r[0] <= r[1] <= r[2], (direction, lst, r)  # recall@K grows with K
            assert full["recall"][f"{direction}_{lst}_mean"] == retrieval[f"{direction}_{lst}"]  # mean recall
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
    assert "patches@demo_flickr" in stages and "regions@demo_flickr" not in stages  # retrieval: no regions
    dag = dvc(proj, "dag", "--dot", "evaluate@wnut17")
    assert "text@wnut17" in dag and "patches" not in dag and "regions" not in dag, dag


def _commit_all(repo):
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)


def test_a_copy_takes_the_committed_params_values_not_an_experiments_leftovers(tmp_path):
    """`dvc exp run -S fusion.use_image=false` leaves that value in the work tree's params.yaml
    (and its own dvc.lock): a test copy takes neither, so the tests measure the committed
    defaults; it does take uncommitted code, and an uncommitted new param with its value."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` does to params.yaml

    src = tmp_path / "src"
    (src / "pipeline").mkdir(parents=True)
    committed = "# every knob\nfusion:\n  layers: 2   # stacked layers\n  use_image: true\ntrain:\n  seed: 42\n"
    (src / "params.yaml").write_text(committed)
    (src / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (src / "pipeline/model.py").write_text("A = 1\n")
    _commit_all(src)

    apply_overrides(src / "params.yaml", ["fusion.use_image=false", "train.seed=1"])
    (src / "dvc.lock").write_text("the experiment's lock\n")
    (src / "pipeline/model.py").write_text("A = 2\n")  # uncommitted code
    (src / "pipeline/new.py").write_text("B = 1\n")    # an untracked module
    left = (src / "params.yaml").read_text()
    assert yaml.safe_load(left)["fusion"]["use_image"] is False

    with pytest.warns(UserWarning, match=r"committed values of fusion\.use_image, train\.seed"):
        proj = copy_project(tmp_path / "copy", source=src)
    assert (proj / "params.yaml").read_text() == committed  # HEAD's file, comments and all
    assert (proj / "dvc.lock").read_text() == "schema: '2.0'\nstages: {}\n"
    assert (proj / "pipeline/model.py").read_text() == "A = 2\n" and (proj / "pipeline/new.py").is_file()
    assert (src / "params.yaml").read_text() == left  # the work tree is not touched
    assert params_for_tests(src)["fusion"]["use_image"] is True

    # a param added in the work tree (with the code that reads it) is kept, values stay HEAD's
    tree = yaml.safe_load(left)
    tree["fusion"]["gate_bias"] = 0.5
    (src / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    with pytest.warns(UserWarning, match="fusion.use_image"):
        proj = copy_project(tmp_path / "copy2", source=src)
    assert yaml.safe_load((proj / "params.yaml").read_text()) == {
        "fusion": {"layers": 2, "use_image": True, "gate_bias": 0.5}, "train": {"seed": 42}}

    # a clean work tree (`git checkout params.yaml`) is copied as it is, without a warning
    subprocess.run(["git", "checkout", "params.yaml"], cwd=src, check=True, capture_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proj = copy_project(tmp_path / "copy3", source=src)
    assert (proj / "params.yaml").read_text() == committed
