"""The params gate: a stage reads exactly what dvc.yaml declares for it."""
import copy
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.params import MissingParamError, ParamsError, UndeclaredParamError, declared_params, load_params
from pipeline.paths import PathEscapeError, safe_join

DVC = """
stages:
  train:
    cmd: python -m stages.train
    params: [fusion, train.lr]
  prepare:
    foreach: ${datasets}
    do:
      cmd: python -m stages.prepare ${key}
      params:
        - datasets.${key}
        - images
  score:
    foreach: [a, b]
    do:
      cmd: x ${item}
      params:
        - params.yaml: [score]
"""
REPO = Path(__file__).resolve().parents[1]
REAL = yaml.safe_load((REPO / "params.yaml").read_text())  # a valid base; tests change what they test


def write_params(root: Path, edit=None) -> dict:
    params = copy.deepcopy(REAL)
    params["datasets"] = {"a": dict(REAL["datasets"]["wnut17"], overrides={}), "b": dict(REAL["datasets"]["wnut17"], dir="data/b")}
    params["datasets"]["a"]["dir"] = "data/a"
    if edit:
        edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.fixture
def root(tmp_path):
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(DVC))
    write_params(tmp_path)
    return tmp_path


def test_declared_sections_and_keys_are_readable(root):
    p = load_params("train", root=root)
    assert p["fusion"]["layers"] == REAL["fusion"]["layers"]
    assert p["fusion"].to_dict() == REAL["fusion"]
    assert p["train"]["lr"] == REAL["train"]["lr"]
    assert p.to_dict() == {"fusion": REAL["fusion"], "train": {"lr": REAL["train"]["lr"]}}


def test_undeclared_reads_fail_loudly(root):
    p = load_params("train", root=root)
    with pytest.raises(UndeclaredParamError, match=r"'train.epochs'.*does not declare"):
        p["train"]["epochs"]
    with pytest.raises(UndeclaredParamError, match="'images'"):
        p["images"]
    # .get must not become a back door
    with pytest.raises(UndeclaredParamError):
        p.get("images", {})
    # nor `in`: Mapping's default would swallow the error and answer False
    with pytest.raises(UndeclaredParamError, match="'images'"):
        "images" in p
    with pytest.raises(UndeclaredParamError, match="'train.epochs'"):
        "epochs" in p["train"]
    assert "lr" in p["train"]
    assert "epochs" not in list(p["train"])


def test_foreach_instance_sees_only_its_dataset(root):
    p = load_params("prepare", item="a", root=root)
    assert p["datasets"]["a"]["dir"] == "data/a"
    with pytest.raises(UndeclaredParamError, match="datasets.b"):
        p["datasets"]["b"]
    assert declared_params("score", item="b", root=root) == ["score"]


def test_missing_declared_param_names_params_yaml(root):
    write_params(root, lambda p: p["fusion"].pop("dropout"))
    with pytest.raises(ParamsError, match=r"params.yaml: 1 problem: fusion.dropout: missing"):
        load_params("train", root=root)
    # an optional key (the schema has its default) is absent from the view, not invented
    write_params(root, lambda p: p["images"].pop("min_side"))
    with pytest.raises(ParamsError, match=r"images.min_side: missing"):
        load_params("prepare", item="a", root=root)
    write_params(root)
    p = load_params("prepare", item="a", root=root)
    assert "fallback_size" not in p["images"] and p["images"].get("fallback_size", 224) == 224
    with pytest.raises(MissingParamError, match=r"params.yaml: missing param 'images.fallback_size'"):
        p["images"]["fallback_size"]


def test_unknown_stage_and_missing_instance(root):
    with pytest.raises(ParamsError, match="no stage named 'nope'"):
        load_params("nope", root=root)
    with pytest.raises(ParamsError, match="foreach stage"):
        load_params("prepare", root=root)


def test_repo_dvc_yaml_declares_params_that_exist():
    """Every params key the real dvc.yaml declares exists in the real params.yaml."""
    repo = Path(__file__).resolve().parents[1]
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, spec in dvc["stages"].items():
        items = [None]
        if "foreach" in spec:
            ref = spec["foreach"]
            items = list(params[ref.strip("${} ")]) if isinstance(ref, str) else list(ref)
        for item in items:
            for key in declared_params(name, item=item, root=repo):
                node = params
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"dvc.yaml stage {name}@{item} declares {key}, absent from params.yaml"
                    node = node[part]


def test_safe_join_refuses_escapes(tmp_path):
    base = tmp_path / "images"
    base.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (base / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    assert safe_join(base, "a/b.jpg") == base.resolve() / "a/b.jpg"
    for bad in ["../secret.jpg", "/etc/passwd", "a/../../secret.jpg", "link.jpg", ""]:
        with pytest.raises(PathEscapeError):
            safe_join(base, bad)


# ---- per-dataset values (datasets.<name>.overrides) ---------------------------------------------
OVERRIDE_DVC = """
stages:
  regions:
    foreach: [a, b]
    do:
      cmd: x ${item}
      params:
        - datasets.${item}
        - detector
  score:
    foreach: [a, b]
    do:
      cmd: y ${item}
      params: [score]
"""


def _override_root(tmp_path, overrides):
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(OVERRIDE_DVC))

    def edit(p):
        p["detector"].update(source="fasterrcnn", topk=10)
        p["datasets"]["a"]["overrides"] = overrides
    write_params(tmp_path, edit)
    return tmp_path


def test_dataset_overrides_apply_to_that_dataset_only(tmp_path):
    root = _override_root(tmp_path, {"detector": {"source": "annotations"}})
    assert load_params("regions", item="a", root=root)["detector"]["source"] == "annotations"
    assert load_params("regions", item="a", root=root)["detector"]["topk"] == 10  # the rest stays global
    assert load_params("regions", item="b", root=root)["detector"]["source"] == "fasterrcnn"


@pytest.mark.parametrize("overrides,message", [
    ({"detector": {"sorce": "annotations"}}, r"datasets.a.overrides.detector.sorce: there is no param"),
    ({"score": {"ks": [1]}}, r"section 'score' cannot be set per dataset"),
    ({"detector": "annotations"}, r"'detector' is a section"),
    ("annotations", r"must be a mapping"),
])
def test_dataset_overrides_refuse_typos_and_untracked_sections(tmp_path, overrides, message):
    root = _override_root(tmp_path, overrides)
    with pytest.raises(ParamsError, match=message):
        load_params("regions", item="a", root=root)


def test_repo_overrides_name_real_params():
    """The committed params.yaml's overrides load for every stage instance of their datasets."""
    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, ds in params["datasets"].items():
        if ds.get("overrides"):
            p = load_params("prepare", item=name, root=repo)
            assert p["datasets"][name]["dir"] == ds["dir"]
    assert load_params("regions", item="demo_tweets", root=repo)["detector"]["source"] == "annotations"
    assert params["detector"]["source"] == "fasterrcnn"


def test_an_override_is_announced_on_stderr(tmp_path, capsys):
    root = _override_root(tmp_path, {"detector": {"source": "annotations"}})
    load_params("regions", item="a", root=root)
    err = capsys.readouterr().err
    assert "detector.source = 'annotations' for a" in err and "global value 'fasterrcnn'" in err
    load_params("regions", item="b", root=root)
    assert capsys.readouterr().err == ""
