"""The params gate: a stage reads exactly what dvc.yaml declares for it."""
import textwrap

import pytest

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
PARAMS = """
fusion: {layers: 2, heads: 4}
train: {lr: 0.1, epochs: 3}
images: {fallback: blank}
datasets:
  a: {dir: data/a}
  b: {dir: data/b}
score: {ks: [1, 5]}
"""


@pytest.fixture
def root(tmp_path):
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(DVC))
    (tmp_path / "params.yaml").write_text(textwrap.dedent(PARAMS))
    return tmp_path


def test_declared_sections_and_keys_are_readable(root):
    p = load_params("train", root=root)
    assert p["fusion"]["layers"] == 2
    assert p["fusion"].to_dict() == {"layers": 2, "heads": 4}
    assert p["train"]["lr"] == 0.1
    assert p.to_dict() == {"fusion": {"layers": 2, "heads": 4}, "train": {"lr": 0.1}}


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
    p = load_params("train", root=root)
    with pytest.raises(MissingParamError, match=r"params.yaml: missing param 'fusion.dropout'"):
        p["fusion"]["dropout"]
    assert p["fusion"].get("dropout", 0.5) == 0.5
    assert "dropout" not in p["fusion"]  # declared (fusion is) but absent from params.yaml
    assert "layers" in p["fusion"]


def test_unknown_stage_and_missing_instance(root):
    with pytest.raises(ParamsError, match="no stage named 'nope'"):
        load_params("nope", root=root)
    with pytest.raises(ParamsError, match="foreach stage"):
        load_params("prepare", root=root)


def test_repo_dvc_yaml_declares_params_that_exist():
    """Every params key the real dvc.yaml declares exists in the real params.yaml."""
    from pathlib import Path

    import yaml

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
    import yaml

    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(OVERRIDE_DVC))
    params = {"detector": {"source": "fasterrcnn", "topk": 10}, "score": {"ks": [1, 5]},
              "datasets": {"a": {"dir": "data/a", "overrides": overrides}, "b": {"dir": "data/b"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
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
    from pathlib import Path

    import yaml

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
