"""The params schema: every bad value is refused before any work, by its dotted name."""
import copy
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.params import ParamsError, declared_params, load_params
from pipeline.schema import SECTIONS

REPO = Path(__file__).resolve().parents[1]
REAL = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def project(tmp_path):
    """A root with the real dvc.yaml; ``project(edit)`` writes params.yaml = the real one, edited."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")

    def write(edit=None):
        p = copy.deepcopy(REAL)
        if edit:
            edit(p)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        return tmp_path
    return write


def _set(path: str, value):
    def edit(p):
        *parents, last = path.split(".")
        node = p
        for k in parents:
            node = node[k]
        node[last] = value
    return edit


@pytest.mark.parametrize("stage,item,path,value,message", [
    # the cases: each once died deep inside or ran with a wrong value
    ("train", "demo_tweets", "fusion.heads", 0, r"fusion.heads = 0: should be greater than or equal to 1"),
    ("train", "demo_tweets", "train.batch_size", "abc", r"train.batch_size = 'abc': should be a valid integer"),
    ("train", "demo_tweets", "train.epochs", True, r"train.epochs = True: should be a valid integer"),
    ("train", "demo_tweets", "train.epochs", 2.5, r"train.epochs = 2.5: should be a valid integer"),
    ("score", "demo_flickr", "score.ks", 5, r"score.ks = 5: should be a valid list"),
    ("train", "demo_tweets", "fusion.layers", 0, r"fusion: layers 0 with use_image true: the image would reach only"),
    # choices, ranges, cross-key rules
    ("train", "demo_tweets", "fusion.text_context", "gru", r"fusion.text_context = 'gru': should be 'lstm', 'transformer' or 'none'"),
    ("train", "demo_tweets", "fusion.hidden", 130, r"fusion: hidden \(130\) must be divisible by heads \(4\)"),
    ("train", "demo_tweets", "fusion.dropout", 1.0, r"fusion.dropout = 1.0: should be less than 1"),
    ("rerank", "demo_flickr", "rerank.top_k", 500, r"rerank: top_k \(500\) cannot exceed pool \(128\)"),
    ("rerank", "demo_flickr", "rerank.egr.t2i.s", "high", r"rerank.egr.t2i.s = 'high': should be a valid number"),
    ("retrieve", "demo_flickr", "retrieval.index", "ivfpq2", r"retrieval.index = 'ivfpq2'"),
    ("patches", "demo_tweets", "clip.device", "gpu", r"clip.device = 'gpu'"),
    ("text", "demo_tweets", "text.layers", [], r"text.layers = \[\]: List should have at least 1 item"),
    # a typo never falls back to a default
    ("train", "demo_tweets", "train.epoch", 3, r"train.epoch: unknown key \(allowed: seed, epochs,"),
    ("prepare", "demo_tweets", "datasets.demo_tweets.spilts", {}, r"datasets.demo_tweets.spilts: unknown key"),
    ("prepare", "demo_tweets", "datasets.demo_tweets.on_bad_line", "ignore", r"datasets.demo_tweets.on_bad_line = 'ignore'"),
    ("prepare", "wnut17", "datasets.wnut17.format", "conl", r"datasets.wnut17.format = 'conl'"),
])
def test_a_bad_value_is_refused_with_its_dotted_name(project, stage, item, path, value, message):
    root = project(_set(path, value))
    with pytest.raises(ParamsError, match=r"^params.yaml: 1 problem: " + message):
        load_params(stage, item=item, root=root)


def test_every_problem_is_reported_at_once(project):
    def edit(p):
        p["train"].update(batch_size="abc", epochs=True)
        p["fusion"]["heads"] = 0
    with pytest.raises(ParamsError, match=r"3 problems: .*fusion.heads.*train.epochs.*train.batch_size"):
        load_params("train", item="demo_tweets", root=project(edit))


def test_only_the_declared_sections_are_checked(project):
    """A stage is not stopped by a bad value in a section it does not read (DVC would not rerun it)."""
    root = project(_set("score.ks", 5))
    assert load_params("train", item="demo_tweets", root=root)["train"]["epochs"] == REAL["train"]["epochs"]


def test_a_text_only_model_may_have_no_fusion_layers(project):
    def edit(p):
        p["fusion"].update(layers=0, use_image=False)
    assert load_params("train", item="demo_tweets", root=project(edit))["fusion"]["layers"] == 0


def test_unknown_sections_and_bad_dataset_names(project):
    root = project(lambda p: p.update(trian={"epochs": 3}))
    with pytest.raises(ParamsError, match=r"trian: unknown section"):
        load_params("train", item="demo_tweets", root=root)

    def bad_name(p):
        p["datasets"]["my set"] = copy.deepcopy(p["datasets"]["wnut17"])
        p["mner_datasets"] = ["demo_tweets", "my set"]
    root = project(bad_name)
    with pytest.raises(ParamsError, match=r"datasets.my set: a dataset name may use only letters, digits"):
        load_params("prepare", item="my set", root=root)


def test_an_overridden_value_is_checked_and_says_where_it_came_from(project):
    root = project(_set("datasets.wnut17.overrides.train", {"epochs": "8"}))
    with pytest.raises(ParamsError, match=r"train.epochs = '8': should be a valid integer \(set by datasets.wnut17.overrides\)"):
        load_params("train", item="wnut17", root=root)


@pytest.mark.parametrize("stage,item,message", [
    ("train", "demo_flickr", r"^demo_flickr is a retrieval dataset; train needs an mner dataset"),
    ("rerank", "demo_tweets", r"^demo_tweets is an mner dataset; rerank needs a retrieval dataset"),
    ("score", "demo_tweets", r"^demo_tweets is an mner dataset; score needs a retrieval dataset"),
    ("evaluate", "demo_flickr", r"^demo_flickr is a retrieval dataset; evaluate needs an mner dataset"),
    ("patches", "wnut17", r"^wnut17 has no images \(format conll\); patches runs only on datasets with images"),
    ("prepare", "nosuch", r"no dataset named 'nosuch' in `datasets` \(have: demo_tweets, demo_flickr, wnut17\); "
                          r"add it there \(README: Using a real dataset\)"),
    ("regions", "demo_flickr", r"^demo_flickr is not in params.yaml region_datasets \(demo_tweets\), the datasets "
                               r"regions runs on; add it there to run regions on it"),
])
def test_the_dataset_kind_is_checked_first(project, stage, item, message):
    with pytest.raises(ParamsError, match=message):
        load_params(stage, item=item, root=project())


def test_the_shipped_params_pass_for_every_stage_instance():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    n = 0
    for name, spec in dvc["stages"].items():
        items = list(REAL[spec["foreach"].strip("${} ")]) if "foreach" in spec else [None]
        for item in items:
            load_params(name, item=item, root=REPO)
            n += 1
    assert n >= 10


def test_schema_and_params_yaml_name_the_same_sections():
    assert set(SECTIONS) == set(REAL)
    # every key of the shipped file is declared (the schema may add optional keys with defaults)
    for section, model in SECTIONS.items():
        if hasattr(model, "model_fields") and isinstance(REAL[section], dict):
            assert set(REAL[section]) <= set(model.model_fields), section
    assert declared_params("train", item="demo_tweets", root=REPO)
