"""Training loop, determinism, checkpoints, stage wiring on real cache files, ablation table."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.mner import ablations
from pipeline.mner.data import MNERDataset, make_collate, type_prompt_tensor
from pipeline.mner.model import MNERConfig
from pipeline.mner.train import (TrainConfig, evaluate, fit, load_checkpoint, predict, save_checkpoint,
                                 train_on_caches, warmup_linear)
from pipeline.stores.shards import write_shard
from pipeline.stores.tables import write_text_features
from tests.test_mner_model import DIMS, TYPES, MemText, synth, tag_index

torch.set_num_threads(1)


def _data(n_train=160, n_valid=60, **kw):
    tr, va = synth(n_train, 0, "t", **kw), synth(n_valid, 1, "v", **kw)
    idx = tag_index()
    dtr = MNERDataset(tr[0], tr[1], idx, patches=tr[2], regions=tr[3])
    dva = MNERDataset(va[0], va[1], idx, patches=va[2], regions=va[3])
    return dtr, dva, make_collate(type_prompt_tensor(tr[1].type_prompts, TYPES))


def _cfg(**kw) -> MNERConfig:
    base = dict(types=TYPES, **DIMS, hidden=32, layers=1, heads=2, slots_per_type=1, dropout=0.0)
    base.update(kw)
    return MNERConfig(**base)


TCFG = dict(epochs=6, batch_size=16, lr=3e-3, lr_crf=3e-2, align_weight=0.1, patience=6, warmup_ratio=0.1)


def test_learns_a_task_only_the_image_can_solve():
    dtr, dva, col = _data()
    full = fit(_cfg(), TrainConfig(**TCFG), dtr, dva, col, progress=False)
    text = fit(_cfg(use_image=False), TrainConfig(**TCFG), dtr, dva, col, progress=False)
    f_full, f_text = full.best_valid["micro"]["f1"], text.best_valid["micro"]["f1"]
    # chance for the type is 1/2, so a text-only tagger that finds every span tops out near 0.5
    assert f_full > 0.9, full.history
    assert f_text < 0.75, text.history
    assert full.history[0]["loss_align"] > 0 and text.history[0]["loss_align"] == 0


def test_region_branch_alone_carries_the_signal():
    dtr, dva, col = _data(signal=("regions",))
    only_regions = fit(_cfg(use_patches=False), TrainConfig(**TCFG), dtr, dva, col, progress=False)
    no_regions = fit(_cfg(use_regions=False), TrainConfig(**TCFG), dtr, dva, col, progress=False)
    assert only_regions.best_valid["micro"]["f1"] > 0.9
    assert no_regions.best_valid["micro"]["f1"] < 0.75


def test_same_seed_same_params_same_metrics():
    dtr, dva, col = _data(48, 16)
    cfg = TrainConfig(**{**TCFG, "epochs": 2})
    a = fit(_cfg(layers=2), cfg, dtr, dva, col, progress=False)
    b = fit(_cfg(layers=2), cfg, dtr, dva, col, progress=False)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == b.history
    c = fit(_cfg(layers=2), TrainConfig(**{**TCFG, "epochs": 2, "seed": 7}), dtr, dva, col, progress=False)
    assert not torch.equal(c.model.state_dict()["emit.weight"], sa["emit.weight"])


def test_early_stopping_keeps_the_best_epoch(monkeypatch):
    import pipeline.mner.train as tr

    dtr, dva, col = _data(32, 16)
    f1s = iter([0.2, 0.6, 0.4, 0.5, 0.9, 0.9])
    real = tr.evaluate

    def fake_eval(model, ds, collate_fn, batch_size=64):
        scores, pred = real(model, ds, collate_fn, batch_size)
        scores["micro"]["f1"] = next(f1s)
        return scores, pred

    monkeypatch.setattr(tr, "evaluate", fake_eval)
    res = fit(_cfg(), TrainConfig(**{**TCFG, "epochs": 6, "patience": 2}), dtr, dva, col, progress=False)
    assert res.best_epoch == 2 and len(res.history) == 4  # epochs 3 and 4 did not improve


def test_param_groups_and_schedule():
    model_cfg = _cfg()
    from pipeline.mner.model import MNERModel

    groups = MNERModel(model_cfg).param_groups(1e-3, 1e-2, 0.01)
    by = {g["name"]: g for g in groups}
    assert by["crf"]["lr"] == 1e-2 and by["decay"]["lr"] == 1e-3 and by["no_decay"]["weight_decay"] == 0.0
    assert len(by["crf"]["params"]) == 3
    n_all = sum(p.numel() for g in groups for p in g["params"])
    assert n_all == sum(p.numel() for p in MNERModel(model_cfg).parameters())
    f = warmup_linear(100, 0.1)
    assert [round(f(s), 3) for s in (0, 4, 9, 10, 55, 99)] == [0.1, 0.5, 1.0, 1.0, 0.5, 0.011]


def test_truncated_words_are_predicted_O_and_counted():
    samples, text, pr, rr = synth(4, 0)
    cut = {s.sample_id: text.feats[s.sample_id][:2] for s in samples}  # keep 2 words each
    ds = MNERDataset(samples, MemText(cut, text.type_prompts), tag_index(), patches=pr, regions=rr)
    col = make_collate(type_prompt_tensor(text.type_prompts, TYPES))
    from pipeline.mner.model import MNERModel

    torch.manual_seed(0)
    model = MNERModel(_cfg())
    with torch.no_grad():  # make the model say B-PER everywhere
        model.emit.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0]))
    preds = predict(model, ds, col)
    for s, p in zip(samples, preds):
        assert len(p) == len(s.tokens) and p[:2] == ["B-PER", "B-PER"] and set(p[2:]) <= {"O"}
    scores, _ = evaluate(model, ds, col)
    assert scores["micro"]["n_gold"] == 4  # gold entities beyond the cut still count
    assert ds.kept_words() == [2, 2, 2, 2]


def test_checkpoint_round_trip(tmp_path):
    from pipeline.mner.model import MNERModel

    torch.manual_seed(0)
    model = MNERModel(_cfg(text_context="transformer", adaptive="scalar", patch_queries=2)).eval()
    save_checkpoint(tmp_path / "m", model, {"best_epoch": 3})
    loaded, meta = load_checkpoint(tmp_path / "m")
    dtr, _, col = _data(6, 2)
    batch = col([dtr[i] for i in range(6)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["emissions"], model(batch)["emissions"], rtol=0, atol=0)
    assert meta == {"best_epoch": 3}
    assert json.loads((tmp_path / "m" / "labels.json").read_text()) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    with pytest.raises(FileNotFoundError, match="train stage"):
        load_checkpoint(tmp_path / "nope")


# ---- stage wiring on real cache files -----------------------------------------------------
def _write_project(root, n_train=96, n_valid=32, n_test=32, max_kept=None):
    """Real Parquet manifests, a real text-feature table and real HDF5 shards under ``root``."""
    splits = {"train": synth(n_train, 0, "t"), "valid": synth(n_valid, 1, "v"), "test": synth(n_test, 2, "x")}
    rows, words, prec, rrec = [], [], {}, {}
    for split, (samples, text, pr, rr) in splits.items():
        for i, s in enumerate(samples):
            rows.append({"split": split, "sample_id": s.sample_id, "image_id": s.image_id,
                         "tokens": s.tokens, "tags": s.tags, "line": i})
            f = text.feats[s.sample_id]
            words.append({"sample_id": s.sample_id, "n_words": len(s.tokens), "feats": f[:max_kept] if max_kept else f})
        prec.update(pr.recs)
        rrec.update(rr.recs)
        prompts = text.type_prompts
    prep = root / "data/prepared/ds"
    prep.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), prep / "samples.parquet")
    ids = sorted(prec)
    broken = ids[0]
    pq.write_table(pa.Table.from_pylist([{"image_id": i, "path": "", "status": "missing" if i == broken else "ok",
                                          "is_fallback": i == broken} for i in ids]), prep / "images.parquet")
    write_text_features(root / "features/ds/text", words, prompts, {"model": "synthetic"})
    for name, recs in (("patches", prec), ("regions", rrec)):
        keys = [k for k in recs[ids[0]]]
        for j, chunk in enumerate((ids[: len(ids) // 2], ids[len(ids) // 2:])):
            arrays = {k: np.stack([np.asarray(recs[i][k]) for i in chunk]) for k in keys}
            write_shard(root / f"features/ds/{name}/shard-{j:05d}.h5", chunk, arrays, {"what": name}, f"fp{j}")
    return splits


FUSION = dict(hidden=32, layers=1, heads=2, slots_per_type=1, text_context="lstm", adaptive="gate",
              patch_queries=0, dropout=0.0, use_image=True, use_patches=True, use_regions=True,
              char_dim=0, shape_dim=0)
TRAIN = dict(seed=3, epochs=4, batch_size=16, lr=3e-3, lr_crf=3e-2, weight_decay=0.01, warmup_ratio=0.1,
             grad_clip=1.0, patience=4, lr_encoder=1e-4, encoder_warmup_ratio=0.1, threads=1)
ALIGN = dict(weight=0.1, temperature=0.07, pooling="mean")


def test_train_and_evaluate_on_real_cache_files(tmp_path, monkeypatch):
    from pipeline.mner.evaluate import evaluate_on_caches

    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    _write_project(tmp_path, max_kept=6)
    res = train_on_caches("ds", FUSION, TRAIN, ALIGN, tmp_path / "models/ds", tmp_path / "dvclive/ds/train", progress=False)
    live = json.loads((tmp_path / "dvclive/ds/train/metrics.json").read_text())
    assert set(live["train"]) == {"loss", "loss_crf", "loss_align"} and set(live["valid"]) == {"precision", "recall", "f1"}
    assert live["best_valid_f1"] == res.best_valid["micro"]["f1"]
    tsv = (tmp_path / "dvclive/ds/train/plots/metrics/valid/f1.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["step", "f1"] and len(tsv) == 1 + len(res.history)

    rep = evaluate_on_caches("ds", tmp_path / "models/ds", tmp_path / "predictions/ds",
                             tmp_path / "metrics/ds/mner.json", tmp_path / "plots/ds", progress=False)
    saved = json.loads((tmp_path / "metrics/ds/mner.json").read_text())  # the headline: a few dvc exp show columns
    assert saved == {"valid": {"f1": rep["valid"]["f1"]},
                     "test": {"f1": rep["test"]["f1"], "per_type": {t: v["f1"] for t, v in rep["test"]["per_type"].items()}}}
    assert json.loads((tmp_path / "reports/ds/mner.json").read_text()) == json.loads(json.dumps(rep))
    assert rep["test"]["f1"] > 0.8  # the image decides the type
    c = rep["test"]["counts"]
    assert c["sentences"] == 32 and c["truncated_words"] > 0 and c["gold_entities"] == 32
    assert rep["valid"]["counts"]["image_fallbacks"] + rep["test"]["counts"]["image_fallbacks"] == 0  # broken id is train's
    conll = (tmp_path / "predictions/ds/test.conll").read_text().split("\n\n")
    assert len([b for b in conll if b.strip()]) == 32
    assert all(len(line.split("\t")) == 3 for line in conll[0].splitlines())
    assert (tmp_path / "plots/ds/test_confusion.png").stat().st_size > 0
    assert (tmp_path / "plots/ds/test_f1_per_type.png").stat().st_size > 0
    csv_rows = (tmp_path / "plots/ds/test_confusion.csv").read_text().splitlines()
    assert csv_rows[0] == "gold,predicted" and len(csv_rows) > 32
    # the same seed gives the same checkpoint bytes
    first = (tmp_path / "models/ds/model.pt").read_bytes()
    train_on_caches("ds", FUSION, TRAIN, ALIGN, tmp_path / "models/ds", None, progress=False)
    assert (tmp_path / "models/ds/model.pt").read_bytes() == first


def test_text_only_never_opens_the_image_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    _write_project(tmp_path, 24, 8, 8)
    import shutil

    shutil.rmtree(tmp_path / "features/ds/patches")
    shutil.rmtree(tmp_path / "features/ds/regions")
    res = train_on_caches("ds", {**FUSION, "use_image": False}, {**TRAIN, "epochs": 1}, ALIGN,
                          tmp_path / "models/ds", None, progress=False)
    assert res.model.vision is None
    with pytest.raises(Exception, match="patches"):
        train_on_caches("ds", FUSION, {**TRAIN, "epochs": 1}, ALIGN, tmp_path / "models/ds", None, progress=False)


# ---- ablations ----------------------------------------------------------------------------
def test_ablation_overrides_and_classification():
    assert ablations.set_args("text_only", 2) == ["-S", "fusion.use_image=false", "-S", "train.seed=2"]
    assert ablations.exp_run_command("qfnet1", 1)[:5] == ["dvc", "exp", "run", "-n", "qfnet1-seed1"]
    flat = {"fusion.layers": 2, "fusion.adaptive": "gate", "fusion.use_image": True, "fusion.use_patches": True,
            "fusion.use_regions": True, "align.weight": 0.1}
    full = ablations.set_args("qfnet1", 3, baseline=flat)  # every ablation key explicit: no leaks between runs
    assert dict(a.split("=") for a in full[1::2]) == {
        "fusion.layers": "1", "align.weight": "0.1", "fusion.adaptive": "gate", "fusion.use_image": "true",
        "fusion.use_patches": "true", "fusion.use_regions": "true", "train.seed": "3"}
    with pytest.raises(KeyError, match="align.weight"):
        ablations.set_args("full", 1, baseline={k: v for k, v in flat.items() if k != "align.weight"})
    base = {"fusion": {"layers": 2, "adaptive": "gate", "use_image": True, "use_patches": True,
                       "use_regions": True}, "align": {"weight": 0.1}, "train": {"seed": 1}}
    for name, ov in ablations.ABLATIONS.items():
        p = ablations.apply_overrides(base, ov)
        assert ablations.classify(ablations.flatten(p)) == name
    assert base["fusion"]["layers"] == 2  # not mutated
    with pytest.raises(KeyError, match="fusion.nope"):
        ablations.apply_overrides(base, {"fusion.nope": 1})


def _exp_state(name, params, f1s):
    metrics = {f"metrics/{d}/mner.json": {"data": {"test": {"f1": f, "precision": f, "recall": f},
                                                     "valid": {"f1": f}}} for d, f in f1s.items()}
    return {"rev": name + "rev", "name": name, "error": None, "experiments": None,
            "data": {"rev": name + "rev", "params": {"params.yaml": {"data": params}}, "metrics": metrics}}


def test_table_from_exp_show_json():
    def params(seed, **fusion):
        return {"fusion": {"layers": 2, "adaptive": "gate", "use_image": True, "use_patches": True,
                           "use_regions": True, **fusion}, "align": {"weight": 0.1}, "train": {"seed": seed}}

    exps = [_exp_state("full-seed1", params(1), {"tw": 0.80}), _exp_state("full-seed2", params(2), {"tw": 0.84}),
            _exp_state("to-1", params(1, use_image=False), {"tw": 0.50}),
            _exp_state("to-2", params(2, use_image=False), {"tw": 0.60})]
    data = [{"rev": "workspace", "name": None, "error": None, "experiments": None,
             "data": _exp_state("ws", params(9), {"tw": 0.1})["data"]},
            {"rev": "abc", "name": "main", "data": _exp_state("base", params(1), {"tw": 0.2})["data"],
             "experiments": [{"revs": [e], "executor": None, "name": e["name"]} for e in exps]}]
    runs = ablations.runs_from_exp_show(data)
    assert sorted(r.name for r in runs) == ["full-seed1", "full-seed2", "to-1", "to-2"]
    table = ablations.markdown_table(runs, ["test_f1"])
    lines = table.strip().splitlines()
    assert lines[0] == "| setting | tw test F1 |"
    assert lines[2] == "| full | 82.00 ± 2.83 (n=2) |"  # mean 0.82, sample sd 0.0283
    assert lines[3] == "| text_only | 55.00 ± 7.07 (n=2) |"
    assert len(ablations.runs_from_exp_show(data, include_workspace=True)) == 5


def test_table_counts_seeds_not_experiments():
    """Experiments that trained the same model with the same seed (they differ in retrieval
    params, a speed knob, or one is the workspace holding the last one) count once: no
    invented seeds, no spread from one seed. A param that shapes the model splits the row."""
    def params(seed, top_k=20, threads=1, hidden=128, **fusion):
        return {"fusion": {"hidden": hidden, "layers": 2, "adaptive": "gate", "use_image": True, "use_patches": True,
                           "use_regions": True, **fusion},
                "align": {"weight": 0.1}, "train": {"seed": seed, "threads": threads}, "rerank": {"top_k": top_k}}

    exps = [_exp_state("q-a", params(42, layers=1), {"tw": 0.9565}),
            _exp_state("q-b", params(42, top_k=10, layers=1), {"tw": 0.9565}),    # retrieval only: same run
            _exp_state("q-c", params(42, threads=2, layers=1), {"tw": 0.9571}),   # a speed knob: same run
            _exp_state("f-1", params(1), {"tw": 0.80}), _exp_state("f-2", params(2), {"tw": 0.84}),
            _exp_state("f-2b", params(2, top_k=5), {"tw": 0.84}),
            _exp_state("h-1", params(1, hidden=64), {"tw": 0.70})]                # shapes the model: its own row
    data = [{"rev": "workspace", "name": None, "error": None, "experiments": None,
             "data": _exp_state("ws", params(1, hidden=64), {"tw": 0.70})["data"]},  # holds h-1's result
            {"rev": "abc", "name": "main", "data": _exp_state("base", params(42), {"tw": 0.2})["data"],
             "experiments": [{"revs": [e], "executor": None, "name": e["name"]} for e in exps]}]
    runs = ablations.runs_from_exp_show(data, include_workspace=True)
    assert len({r.config for r in runs if r.ablation == "qfnet1"}) == 1
    lines = ablations.markdown_table(runs, ["test_f1"]).splitlines()
    assert lines[2:5] == ["| full (fusion.hidden=128) | 82.00 ± 2.83 (n=2) |",
                          "| full (fusion.hidden=64) | 70.00 (n=1) |",
                          "| qfnet1 | 95.67 (n=1) |"]  # one seed: the mean of its runs, no spread
    assert lines[5:7] == ["", "n counts distinct `train.seed` values; runs that differ only in params that do not "
                              "shape the MNER scores count once:"]
    notes = lines[7:]
    assert notes == [
        "- full (fusion.hidden=128), tw, seed 2: 2 runs with the same params (f-2, f-2b) counted once",
        "- full (fusion.hidden=64), tw, seed 1: 2 runs with the same params (workspace, h-1) counted once",
        "- qfnet1, tw, seed 42: 3 runs with the same params (q-a, q-b, q-c) counted once "
        "(their test F1: 95.65, 95.65, 95.71; the mean is used)"], notes
    # a dataset's own entry shapes its runs; another dataset's does not
    a = ablations.mner_config({"datasets.tw.dir": "x", "datasets.other.dir": "y", "train.seed": 1, "train.lr": 1,
                               "rerank.top_k": 3, "clip.threads": 2}, ablations.shaping_keys("tw", {}))
    assert a == (("datasets.tw.dir", '"x"'), ("train.lr", "1"))
    # a set without images: the image stages' params do not shape it
    keys = ablations.shaping_keys("wnut", {"image_datasets": ["tw"], "region_datasets": ["tw"]})
    assert "text" in keys and "train" in keys and "clip" not in keys and "detector" not in keys


def test_committed_params_ignore_workspace_edits(tmp_path):
    import subprocess

    (tmp_path / "params.yaml").write_text("fusion:\n  layers: 2\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "params.yaml").write_text("fusion:\n  layers: 1\n")  # what a previous exp run left behind
    assert ablations.committed_params(tmp_path) == {"fusion.layers": 2}


def test_encoder_layers_warm_up_on_their_own_schedule():
    """Hand-worked factors: 20 steps; encoder warmup 0.5 -> 10 steps, the rest 0.1 -> 2 steps."""
    from pipeline.mner.model import MNERModel
    from pipeline.mner.train import optimizer_and_schedule

    bert = {"model_type": "bert", "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
            "vocab_size": 10, "max_position_embeddings": 16}
    cfg = _cfg(use_image=False, tune_top=1, depth=2, text_layers=[1, 2], encoder_config=bert)
    model = MNERModel(cfg)
    tcfg = TrainConfig(lr=1e-3, lr_crf=1e-2, lr_encoder=1e-4, warmup_ratio=0.1, encoder_warmup_ratio=0.5)
    opt, sched = optimizer_and_schedule(model, tcfg, 20)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay", "crf", "encoder", "encoder_no_decay"]
    enc = {n for n, _ in model.named_parameters() if n.startswith("text.top.")}
    assert enc and sum(len(g["params"]) for g in opt.param_groups if g["name"].startswith("encoder")) == len(enc)
    for _ in range(4):
        opt.step()
        sched.step()
    lr = dict(zip(names, sched.get_last_lr()))
    assert lr["encoder"] == pytest.approx(1e-4 * 5 / 10)       # still warming up: step 4 -> (4+1)/10
    assert lr["decay"] == pytest.approx(1e-3 * (20 - 4) / 18)  # decaying since step 2: (20-4)/(20-2)
    assert lr["crf"] == pytest.approx(1e-2 * (20 - 4) / 18)
