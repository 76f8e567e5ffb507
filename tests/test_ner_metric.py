"""Entity metric: must equal seqeval's default (conlleval) mode on crafted and random sequences."""
from __future__ import annotations

import random
import warnings

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

from pipeline.metrics.ner import entity_scores, get_entities, type_confusion

CRAFTED = {
    "stray_I": ([["O", "I-PER", "I-PER", "O"]], [["O", "B-PER", "I-PER", "O"]]),
    "stray_I_pred": ([["B-LOC", "O", "B-PER"]], [["I-LOC", "O", "I-PER"]]),
    "adjacent_same_type": ([["B-PER", "B-PER", "O"]], [["B-PER", "I-PER", "O"]]),
    "adjacent_both": ([["B-PER", "B-PER", "I-PER"]], [["B-PER", "B-PER", "I-PER"]]),
    "type_change": ([["I-PER", "I-LOC", "O"]], [["B-PER", "B-LOC", "O"]]),
    "type_change_inside": ([["B-PER", "I-LOC", "I-LOC"]], [["B-PER", "I-PER", "I-LOC"]]),
    "several_types": (
        [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"], ["B-MISC", "O", "B-PER"]],
        [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "O"], ["B-MISC", "O", "O"]],
    ),
    "empty_predictions": ([["B-PER", "O"], ["B-LOC", "I-LOC"]], [["O", "O"], ["O", "O"]]),
    "empty_gold": ([["O", "O"], ["O"]], [["B-PER", "O"], ["I-ORG"]]),
    "all_empty": ([["O", "O"]], [["O", "O"]]),
    "sentence_boundary": ([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["B-PER", "O"]]),
    "iobes": ([["S-PER", "B-LOC", "E-LOC", "E-LOC"]], [["S-PER", "B-LOC", "I-LOC", "E-LOC"]]),
}


def _seqeval(y_true, y_pred) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = classification_report(y_true, y_pred, output_dict=True)
        micro = (precision_score(y_true, y_pred), recall_score(y_true, y_pred), f1_score(y_true, y_pred))
    per = {k: v for k, v in rep.items() if not k.endswith(" avg")}
    return {"micro": micro, "per_type": per}


def _check_equal(y_true, y_pred) -> None:
    ours = entity_scores(y_true, y_pred)
    ref = _seqeval(y_true, y_pred)
    m = ours["micro"]
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(ref["micro"], abs=1e-12)
    assert set(ours["per_type"]) == set(ref["per_type"])
    for t, r in ref["per_type"].items():
        o = ours["per_type"][t]
        assert o["precision"] == pytest.approx(r["precision"], abs=1e-12), t
        assert o["recall"] == pytest.approx(r["recall"], abs=1e-12), t
        assert o["f1"] == pytest.approx(r["f1-score"], abs=1e-12), t
        assert o["n_gold"] == r["support"], t


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_equals_seqeval(name):
    y_true, y_pred = CRAFTED[name]
    for sent in y_true + y_pred:
        assert get_entities(sent) == seqeval_entities(sent)
    _check_equal(y_true, y_pred)


def test_hand_worked_values():
    # gold: PER(0-1), LOC(3), ORG(5-6), MISC, PER  -> 5; pred: PER(0-1), ORG(3), ORG(5), MISC -> 4; tp = 2
    y_true, y_pred = CRAFTED["several_types"]
    m = entity_scores(y_true, y_pred)["micro"]
    assert (m["tp"], m["n_gold"], m["n_pred"]) == (2, 5, 4)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.4)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    # stray I- starts an entity: I-PER I-PER == one PER entity at 1..2
    assert get_entities(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 2)]
    assert get_entities(["I-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert get_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert entity_scores([["B-PER"]], [["O"]])["micro"]["f1"] == 0.0


def test_random_sequences_equal_seqeval():
    rng = random.Random(0)
    alphabet = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "I-MISC", "B-MISC"]
    for _ in range(200):
        n_sent = rng.randint(1, 4)
        y_true, y_pred = [], []
        for _ in range(n_sent):
            n = rng.randint(1, 8)
            y_true.append([rng.choice(alphabet) for _ in range(n)])
            y_pred.append([rng.choice(alphabet) for _ in range(n)])
        _check_equal(y_true, y_pred)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sentence 0"):
        entity_scores([["O", "B-PER"]], [["O"]])
    with pytest.raises(ValueError, match="1 gold sentences but 2"):
        entity_scores([["O"]], [["O"], ["O"]])


def test_type_confusion_pairs():
    y_true = [["B-PER", "I-PER", "O", "B-LOC", "O", "O"]]
    y_pred = [["B-ORG", "B-PER", "O", "O", "O", "B-MISC"]]
    assert sorted(type_confusion(y_true, y_pred)) == sorted(
        [("PER", "ORG"), ("PER", "PER"), ("LOC", "O"), ("O", "MISC")])
