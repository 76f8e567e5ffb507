"""Entity-level micro precision / recall / F1, exactly as seqeval's default (conlleval) mode.

Chunks are read the way conlleval.pl (and ``seqeval.metrics`` without ``mode='strict'``) reads
them: a stray ``I-X`` after ``O`` starts an entity, a change of type starts a new entity
(``I-PER I-LOC`` is two entities), ``B-X B-X`` is two entities; E-/S- (IOBES) tags are
understood too. Sentences are joined with an ``O`` between them, so an entity never crosses
a sentence boundary. An entity counts as correct only if type, start and end all match.
Division by zero gives 0 (seqeval's ``zero_division='warn'`` value, without the warning).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

Entity = tuple[str, int, int]  # (type, first index, last index), indices in the joined sequence


def _split(label: str) -> tuple[str, str]:
    """(prefix letter, type) the way seqeval splits a tag (non-suffix scheme)."""
    tag = label[0]
    type_ = label[1:].split("-", maxsplit=1)[-1] or "_"
    return tag, type_


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(seq: Sequence[str] | Sequence[Sequence[str]]) -> list[Entity]:
    """Entities of one tag sequence, or of several sentences joined with an ``O`` between them."""
    if any(isinstance(s, (list, tuple)) for s in seq):
        flat: list[str] = []
        for sent in seq:
            flat.extend(sent)
            flat.append("O")
        seq = flat
    prev_tag, prev_type, begin = "O", "", 0
    chunks: list[Entity] = []
    for i, label in enumerate(list(seq) + ["O"]):
        if not label:
            raise ValueError(f"empty tag at position {i}")
        tag, type_ = _split(label)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "n_gold": n_gold, "n_pred": n_pred, "tp": tp}


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict:
    """Micro P/R/F1 over all entities and per type.

    Returns ``{"micro": {precision, recall, f1, n_gold, n_pred, tp}, "per_type": {type: {...}}}``;
    ``per_type`` lists every type seen in gold or predictions (sorted), like seqeval's report.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold sentences but {len(y_pred)} predicted ones")
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} gold tags but {len(p)} predicted tags")
    gold = set(get_entities([list(s) for s in y_true])) if y_true else set()
    pred = set(get_entities([list(s) for s in y_pred])) if y_pred else set()
    tp_by = Counter(e[0] for e in gold & pred)
    gold_by = Counter(e[0] for e in gold)
    pred_by = Counter(e[0] for e in pred)
    per_type = {t: _prf(tp_by[t], pred_by[t], gold_by[t]) for t in sorted(set(gold_by) | set(pred_by))}
    return {"micro": _prf(len(gold & pred), len(pred), len(gold)), "per_type": per_type}


def type_confusion(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]],
                   none: str = "O") -> list[tuple[str, str]]:
    """(gold type, predicted type) pairs for overlapping gold / predicted spans.

    Every overlapping pair is listed once; a gold entity that no prediction overlaps gives
    ``(type, none)``, a predicted entity that overlaps no gold entity gives ``(none, type)``.
    """
    pairs: list[tuple[str, str]] = []
    for t_seq, p_seq in zip(y_true, y_pred):
        gold, pred = get_entities(list(t_seq)), get_entities(list(p_seq))
        hit_pred: set[int] = set()
        for g in gold:
            found = False
            for j, p in enumerate(pred):
                if p[1] <= g[2] and g[1] <= p[2]:
                    pairs.append((g[0], p[0]))
                    hit_pred.add(j)
                    found = True
            if not found:
                pairs.append((g[0], none))
        pairs.extend((none, p[0]) for j, p in enumerate(pred) if j not in hit_pred)
    return pairs
