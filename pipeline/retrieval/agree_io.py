"""AGREE's file formats: prediction JSON lines, ground-truth JSON lines, result JSON.

Predictions (one line per query, best first)::

    {"query_id": 8, "item_ids": ["9", "17", ...]}      # text to image: a caption's images
    {"image_id": "9", "item_ids": [8, 12, ...]}         # image to text: an image's captions

Ids are kept as strings inside the pipeline and written back in the JSON type AGREE used
(meta.json of the prepared dataset: ``query_id_type``, ``image_id_type``, "int" or "str"),
one type per kind of id across both files (:func:`prediction_id_types`). A query with an
empty ``item_ids`` list is never written: AGREE's scripts read ``item_ids[0]``.
Result (recalls in percent)::

    {"success": true, "score": mean, "scoreJson": {"score": mean, "mean_recall": mean,
     "r1": .., "r5": .., "r10": ..}}
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_path

ID_TYPES = ("int", "str")
KEYS = {"t2i": "query_id", "i2t": "image_id"}  # the id key of a prediction line per direction


class AgreeFormatError(ValueError):
    """A file does not follow AGREE's format (the message names file and line)."""


def load_id_types(meta_path: str | os.PathLike) -> dict[str, str]:
    """JSON id types per prediction file and field, from a prepared meta.json.

    Returns ``{"t2i_query", "t2i_item", "i2t_query", "i2t_item"}`` -> "int" | "str":
    query ids take the type of the test texts / images files (``query_id_type``,
    ``image_id_type``); item ids the type the ground-truth files use for their
    ``item_ids`` (``text_item_id_type``, ``image_item_id_type``, falling back to the
    other file's id type), so AGREE's evaluation compares like with like. An absent
    or ``mixed`` type is written as str. Prediction files take these through
    :func:`prediction_id_types`.
    """
    p = Path(meta_path)
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: not found (written by the `prepare` stage)") from None
    except json.JSONDecodeError as e:
        raise AgreeFormatError(f"{p}: invalid JSON: {e}") from None

    def typ(*keys: str) -> str:
        for k in keys:
            if k in meta:
                t = meta[k]
                if t not in (*ID_TYPES, "mixed"):
                    raise AgreeFormatError(f"{p}: {k} must be 'int', 'str' or 'mixed', got {t!r}")
                return "int" if t == "int" else "str"
        return "str"

    return {"t2i_query": typ("query_id_type"), "t2i_item": typ("text_item_id_type", "image_id_type"),
            "i2t_query": typ("image_id_type"), "i2t_item": typ("image_item_id_type", "query_id_type")}


def prediction_id_types(types: Mapping[str, str]) -> dict[str, str]:
    """The id types to write both prediction files with: one per kind of id, str if either is str.

    ``types`` as :func:`load_id_types` gives them. Image ids are the t2i items and the i2t
    queries, caption ids the t2i queries and the i2t items. AGREE's TBR script
    (eval_back_retrieval.py) looks each item id of one file up as a query id of the other,
    so both files must spell an id alike; its scoring accepts str ids against int ground
    truth (it converts them), never int ids against str.
    """
    image = "int" if types["t2i_item"] == types["i2t_query"] == "int" else "str"
    caption = "int" if types["t2i_query"] == types["i2t_item"] == "int" else "str"
    return {"t2i_query": caption, "t2i_item": image, "i2t_query": image, "i2t_item": caption}


def to_json_id(item_id: str, typ: str, where: str = "") -> int | str:
    """An id string as AGREE wrote it (int ids back to int)."""
    if typ == "str":
        return str(item_id)
    try:
        v = int(item_id)
    except ValueError:
        raise AgreeFormatError(f"{where}: id {item_id!r} is not an integer, but meta.json says int ids") from None
    if str(v) != str(item_id):
        raise AgreeFormatError(f"{where}: id {item_id!r} would not round-trip as an integer")
    return v


def _id_str(v: Any, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise AgreeFormatError(f"{where}: ids must be int or str, got {type(v).__name__} {v!r}")
    return str(v)


def write_predictions(path: str | os.PathLike, direction: str, lists: Iterable[tuple[str, Sequence[str]]],
                      query_type: str, item_type: str) -> Path:
    """Write (query id, ranked item ids) pairs as AGREE prediction JSON lines (atomically).

    direction ``t2i``: lines ``{"query_id": caption, "item_ids": [images]}``;
    ``i2t``: ``{"image_id": image, "item_ids": [captions]}``. An empty item list is an error
    (nothing is written): AGREE's scripts cannot read it.
    """
    key = KEYS[direction]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for qid, items in lists:
                line = {key: to_json_id(qid, query_type, str(path)),
                        "item_ids": [to_json_id(i, item_type, str(path)) for i in items]}
                if not line["item_ids"]:
                    raise AgreeFormatError(
                        f"{path}: {key} {qid!r} has no candidates (an empty item_ids list, which AGREE's scripts "
                        "cannot read); its retrieval pool is empty: the gallery is empty, or an approximate index "
                        "found nothing for it (raise retrieval.nprobe / retrieval.ef_search)")
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON names file and line."""
    p = Path(path)
    try:
        f = open(p, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: not found") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AgreeFormatError(f"{p}:{n}: invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise AgreeFormatError(f"{p}:{n}: expected a JSON object")
            yield n, obj


def read_id_lists(path: str | os.PathLike, key: str, list_key: str = "item_ids") -> dict[str, list[str]]:
    """``{id: [item ids]}`` (all as strings) from JSON lines with ``key`` and ``list_key``.

    Reads AGREE predictions (``query_id``/``image_id`` + ``item_ids``) and AGREE ground
    truth files (the same keys); a missing key, a non-list or a repeated id is an error.
    """
    out: dict[str, list[str]] = {}
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        if key not in obj or list_key not in obj:
            raise AgreeFormatError(f"{where}: expected keys {key!r} and {list_key!r}, got {sorted(obj)}")
        qid = _id_str(obj[key], where)
        items = obj[list_key]
        if not isinstance(items, list):
            raise AgreeFormatError(f"{where}: {list_key!r} must be a list")
        if qid in out:
            raise AgreeFormatError(f"{where}: {key} {obj[key]!r} appears twice")
        out[qid] = [_id_str(i, where) for i in items]
    return out


def read_predictions(path: str | os.PathLike, direction: str) -> dict[str, list[str]]:
    """An AGREE prediction file of ``direction`` (t2i: query_id; i2t: image_id) as id strings."""
    return read_id_lists(path, KEYS[direction])


def result_json(recalls: Mapping[str, float]) -> dict[str, Any]:
    """AGREE's result object from ``{"r1", "r5", "r10", "mean"}`` (percent)."""
    mean = float(recalls["mean"])
    return {"success": True, "score": mean,
            "scoreJson": {"score": mean, "mean_recall": mean,
                          "r1": float(recalls["r1"]), "r5": float(recalls["r5"]), "r10": float(recalls["r10"])}}


def write_result(path: str | os.PathLike, recalls: Mapping[str, float]) -> Path:
    """Write AGREE's result JSON (one line, key order as AGREE's evaluation writes it)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result_json(recalls)) + "\n", encoding="utf-8")
    return Path(path)


def read_result(path: str | os.PathLike) -> dict[str, float]:
    """``{"r1", "r5", "r10", "mean"}`` back from an AGREE result JSON."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
        sj = obj["scoreJson"]
        return {"r1": float(sj["r1"]), "r5": float(sj["r5"]), "r10": float(sj["r10"]), "mean": float(sj["mean_recall"])}
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AgreeFormatError(f"{p}: not an AGREE result JSON ({type(e).__name__}: {e})") from None


__all__ = ["AgreeFormatError", "KEYS", "load_id_types", "prediction_id_types", "to_json_id", "write_predictions",
           "read_jsonl", "read_id_lists", "read_predictions", "result_json", "write_result", "read_result"]
