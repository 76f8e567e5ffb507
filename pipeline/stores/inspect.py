"""Look into any cache: summary, one item, integrity checks, regions drawn on an image.

Works on a shard dir (or one ``.h5`` shard), a text-feature dir, a caption-feature dir,
any Parquet file (prepared manifests included), an MNER checkpoint (``model.pt``), and any
other output folder (``features/<ds>/retrieval``, ``models/<ds>``, ``predictions/<ds>``):
its files are listed and each Parquet table or checkpoint in it is described and checked. Readers here are tolerant on purpose:
a damaged cache is described and its problems listed, instead of failing at the first.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.stores import shards as S
from pipeline.stores import tables as T

MAX_LISTED = 5  # ids named per problem


class InspectError(RuntimeError):
    """Usage error or an unreadable path (exit code 2)."""


# ---- what is at PATH -------------------------------------------------------------------------

def detect_kind(path: str | os.PathLike) -> str:
    """'shards' (dir or one .h5), 'text', 'captions', 'table' (any .parquet), 'checkpoint'
    (a .pt file) or 'folder' (any other directory holding files)."""
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".h5":
            return "shards"
        if p.suffix == ".parquet":
            return "table"
        if p.suffix == ".pt":
            return "checkpoint"
        raise InspectError(f"{p}: not a cache (expected a shard dir, a .h5 shard, a feature dir, a .parquet "
                           f"file, a .pt checkpoint or an output folder)")
    if S.shard_files(p) or S.temp_leftovers(p):
        return "shards"
    if (p / T.WORDS_FILE).exists() or (p / T.TYPE_PROMPTS_FILE).exists():
        return "text"
    if (p / T.CAPTIONS_FILE).exists():
        return "captions"
    if _folder_files(p):
        return "folder"
    raise InspectError(f"{p}: an empty folder; nothing to inspect (has the stage that writes it run?)")


def _folder_files(p: Path) -> list[Path]:
    """Every file under ``p`` (recursively, sorted), hidden ones aside."""
    return sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _ids_text(ids: Sequence[str], total: int | None = None) -> str:
    total = len(ids) if total is None else total
    shown = ", ".join(repr(i) for i in list(ids)[:MAX_LISTED])
    return shown + (f", ... ({total} in all)" if total > MAX_LISTED else "")


def array_stats(a: np.ndarray, n_values: int = 6) -> str:
    """'shape dtype min/mean/max/std, first values' for one array."""
    a = np.asarray(a)
    head = f"{tuple(a.shape)} {a.dtype}"
    if a.size == 0:
        return head + " (empty)"
    flat = a.reshape(-1)
    vals = ", ".join(f"{v:.4g}" if a.dtype.kind == "f" else str(v) for v in flat[:n_values])
    vals = f"[{vals}{', ...' if flat.size > n_values else ''}]"
    if a.dtype.kind in "fiu":
        f = flat.astype(np.float64)
        finite = np.isfinite(f)
        bad = f" nonfinite={int((~finite).sum())}" if not finite.all() else ""
        g = f[finite]
        if g.size:
            head += f" min={g.min():.4g} mean={g.mean():.4g} max={g.max():.4g} std={g.std():.4g}{bad}"
        else:
            head += bad
    elif a.dtype.kind == "b":
        head += f" true={int(flat.sum())}/{flat.size}"
    return f"{head} {vals}"


# ---- tolerant shard scan -------------------------------------------------------------------------

@dataclass
class ShardInfo:
    path: Path
    ids: list[str] = field(default_factory=list)
    count: int | None = None
    complete: bool = False
    fingerprint: str = ""
    run_fingerprint: str = ""
    provenance: dict | None = None
    layout: dict[str, tuple[tuple[int, ...], str, tuple[int, ...] | None]] = field(default_factory=dict)
    error: str | None = None


def scan_shard(path: Path) -> ShardInfo:
    info = ShardInfo(path)
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            info.complete = bool(a.get("complete", False))
            info.count = int(a["count"]) if "count" in a else None
            info.fingerprint = S._attr_str(a.get("fingerprint", ""))
            info.run_fingerprint = S._attr_str(a.get("run_fingerprint", ""))
            try:
                info.provenance = json.loads(S._attr_str(a.get("provenance", "{}")))
            except ValueError:
                info.provenance = None
            if "ids" not in f:
                info.error = "no 'ids' dataset"
                return info
            info.ids = S.read_ids(path, f["ids"])
            for k in f.keys():
                ds = f[k]
                if isinstance(ds, h5py.Dataset):
                    try:
                        dt = S.storage_dtype(ds)  # bfloat16 (stored as uint16 bits), float16, float32, ...
                    except S.ShardError as e:
                        dt = f"{ds.dtype} [{e}]"
                    if dt == S.BFLOAT16:
                        dt = "bfloat16 (stored as uint16 bits)"
                    info.layout[k] = (ds.shape, dt, ds.chunks)
    except Exception as e:
        info.error = f"cannot read ({type(e).__name__}: {e})"
    return info


def _shard_files_at(p: Path) -> list[Path]:
    return [p] if p.is_file() else S.shard_files(p)


def scan_shards(path: str | os.PathLike) -> list[ShardInfo]:
    p = Path(path)
    files = _shard_files_at(p)
    if not files:
        raise InspectError(f"{p}: no shard-*.h5 files")
    return [scan_shard(f) for f in files]


# ---- summary -------------------------------------------------------------------------------------

def summary(path: str | os.PathLike) -> str:
    """Files, item count, each dataset's shape and dtype, provenance."""
    kind = detect_kind(path)
    return {"shards": _summary_shards, "text": _summary_text, "captions": _summary_captions,
            "table": _summary_table, "checkpoint": _summary_checkpoint, "folder": _summary_folder}[kind](Path(path))


def _summary_shards(p: Path) -> str:
    infos = scan_shards(p)
    n = sum(len(i.ids) for i in infos)
    lines = [f"{p}: HDF5 shards, {len(infos)} file(s), {n} items"]
    for i in infos[:10]:
        state = "" if i.complete and not i.error else f"  [{i.error or 'INCOMPLETE'}]"
        lines.append(f"  {i.path.name}  {len(i.ids)} items  {_fmt_bytes(i.path.stat().st_size)}{state}")
    if len(infos) > 10:
        lines.append(f"  ... {len(infos) - 10} more shard(s)")
    if p.is_dir() and (tmp := S.temp_leftovers(p)):
        lines.append(f"  temp leftovers of a killed run: {', '.join(t.name for t in tmp)}")
    first = next((i for i in infos if not i.error), None)
    if first:
        lines.append("  datasets (over all shards):")
        width = max(len(k) for k in first.layout)
        for k, (shape, dt, chunks) in first.layout.items():
            ch = f"  chunks {tuple(chunks)}" if chunks else ""
            lines.append(f"    {k:<{width}}  {(n, *shape[1:])}  {dt}{ch}")
        lines.append(f"  fingerprint: {first.run_fingerprint}")
        lines.append("  provenance:")
        lines.append(_indent(_pretty(first.provenance)))
    return "\n".join(lines)


def _table_summary_lines(t: T.FeatureTable) -> list[str]:
    lines = [f"  {t.path.name}  {t.num_rows} rows  {_fmt_bytes(t.path.stat().st_size)}"]
    for name, vals in t.columns.items():
        kinds = sorted({type(v).__name__ for v in vals[:1000]})
        lines.append(f"    {name:<14} ({t.num_rows},) {'/'.join(kinds) or 'empty'}")
    for name in t.array_names:
        shapes = t.shapes(name)
        if len(shapes) and np.all(shapes == shapes[0]):
            shape = f"({t.num_rows}, {', '.join(map(str, shapes[0]))})"
        elif len(shapes):
            var = ["n" if shapes[:, j].min() != shapes[:, j].max() else str(shapes[0, j]) for j in range(shapes.shape[1])]
            shape = f"({t.num_rows}, [{', '.join(var)}]) variable rows: n in {shapes.min(axis=0).tolist()}..{shapes.max(axis=0).tolist()}"
        else:
            shape = "(0, ...)"
        lines.append(f"    {name:<14} {shape} {t.value_dtype(name)}")
    return lines


def _summary_text(p: Path) -> str:
    lines = [f"{p}: text features (Parquet)"]
    prov = None
    for f, key in ((T.WORDS_FILE, "sample_id"), (T.TYPE_PROMPTS_FILE, "type")):
        if not (p / f).exists():
            lines.append(f"  {f}: MISSING")
            continue
        t = T.FeatureTable(p / f, verify=False)
        lines += _table_summary_lines(t)
        if key == "type":
            lines.append(f"    types: {', '.join(map(str, t.columns['type']))}")
        else:
            ids = t.columns[key]
            lines.append(f"    ids, e.g.: {_ids_text([str(i) for i in ids[:MAX_LISTED]], len(ids))}")
        prov = prov or t.provenance
    lines += ["  provenance:", _indent(_pretty(prov))]
    return "\n".join(lines)


def _summary_captions(p: Path) -> str:
    t = T.FeatureTable(p / T.CAPTIONS_FILE, verify=False)
    lines = [f"{p}: caption features (Parquet)"] + _table_summary_lines(t)
    ents = np.asarray(t.columns.get("n_entities", []))
    if ents.size:
        lines.append(f"    entities per caption: min {ents.min()} mean {ents.mean():.2f} max {ents.max()}")
    lines += ["  provenance:", _indent(_pretty(t.provenance))]
    return "\n".join(lines)


def _summary_table(p: Path) -> str:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(p)
    schema = pq.read_schema(p)
    lines = [f"{p}: Parquet table, {meta.num_rows} rows, {meta.num_row_groups} row group(s), {_fmt_bytes(p.stat().st_size)}"]
    for f in schema:
        lines.append(f"    {f.name:<14} {f.type}")
    if meta.num_rows:
        head = pq.read_table(p).slice(0, 3).to_pylist()
        lines.append("  first rows:")
        for row in head:
            lines.append("    " + _short_row(row))
    lines += ["  provenance:", _indent(_pretty(T.read_parquet_provenance(p)))]
    return "\n".join(lines)


def _short_row(row: dict, limit: int = 200) -> str:
    parts = []
    for k, v in row.items():
        if isinstance(v, list) and len(v) > 8:
            v = v[:8] + ["..."]
        parts.append(f"{k}={v!r}")
    s = ", ".join(parts)
    return s if len(s) <= limit else s[:limit] + " ..."


# ---- one item --------------------------------------------------------------------------------------

ID_COLUMNS = ("image_id", "sample_id", "caption_id", "query_id", "type")


def show_item(path: str | os.PathLike, item_id: str) -> str:
    """One item's arrays: shapes, stats, a few values (region slots as a table)."""
    p = Path(path)
    kind = detect_kind(p)
    if kind == "shards":
        for info in scan_shards(p):
            if item_id in info.ids:
                row = info.ids.index(item_id)
                with h5py.File(info.path, "r") as f:
                    arrays = {k: np.asarray(S.read_checked(info.path, f[k], row)) for k in f.keys() if k != "ids"}
                    stored = {k: S.storage_dtype(f[k]) for k in arrays}
                    arrays = {k: S.decode_storage(v, S.dataset_encoding(f[k])) for k, v in arrays.items()}
                lines = [f"{item_id!r}: {info.path.name} row {row}"]
                lines += [f"  {k:<13} {array_stats(v)}" + (f" (stored as {stored[k]})" if stored[k] != str(v.dtype) else "")
                          for k, v in arrays.items()]
                if {"boxes", "mask"} <= set(arrays):
                    lines += _region_table(arrays, info.provenance or {})
                return "\n".join(lines)
        raise InspectError(f"{p}: no item with id {item_id!r}")
    if kind == "text":
        tf = T.TextFeatures(p)
        if item_id in tf:
            f = tf.get(item_id)
            return "\n".join([f"{item_id!r}: n_words={tf.n_words(item_id)} n_kept={tf.n_kept(item_id)}",
                              f"  feats (n_kept, n_layers, d) {array_stats(f)}"]
                             + [f"  word {w}: norm per layer {np.linalg.norm(f[w], axis=-1).round(3).tolist()}"
                                for w in range(min(len(f), 8))])
        if item_id in tf.type_prompts:
            return f"type prompt {item_id!r}: {array_stats(tf.type_prompts[item_id])}"
        raise InspectError(f"{p}: no sample or entity type {item_id!r}")
    if kind == "captions":
        cf = T.CaptionFeatures(p)
        if item_id not in cf:
            raise InspectError(f"{p}: no caption {item_id!r}")
        i, c = cf.index(item_id), cf.get(item_id)  # one caption's row group, not the whole table
        lines = [f"{item_id!r}: row {i}, n_entities={c['n_entities']}",
                 f"  emb        {array_stats(c['emb'])}",
                 f"  prompt_emb {array_stats(c['prompt_emb'])}",
                 f"  mask_emb   {array_stats(c['mask_emb'])}",
                 "  slot  cos(caption, prompt)  cos(caption, masked)"]
        e = c["emb"] / max(np.linalg.norm(c["emb"]), 1e-12)
        for s in range(c["prompt_emb"].shape[0]):
            pe, me = c["prompt_emb"][s], c["mask_emb"][s]
            cp = float(pe @ e / max(np.linalg.norm(pe), 1e-12))
            cm = float(me @ e / max(np.linalg.norm(me), 1e-12))
            pad = "" if s < c["n_entities"] else "  (padding)"
            lines.append(f"  {s:>4}  {cp:>20.4f}  {cm:>20.4f}{pad}")
        return "\n".join(lines)
    table = T.read_manifest(p)
    col = next((c for c in ID_COLUMNS if c in table.column_names), None)
    if col is None:
        raise InspectError(f"{p}: no id column (one of {', '.join(ID_COLUMNS)})")
    rows = [r for r in table.to_pylist() if str(r[col]) == item_id]
    if not rows:
        raise InspectError(f"{p}: no row with {col} {item_id!r}")
    return "\n".join(_pretty(r) for r in rows)


def _category_names(provenance: dict) -> list[str]:
    names = provenance.get("categories")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    from pipeline.encoders.detector import coco_categories

    return coco_categories()


def _label_name(names: Sequence[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else f"#{label}"


def _region_table(arrays: dict[str, np.ndarray], provenance: dict) -> list[str]:
    names = _category_names(provenance)
    mask = arrays["mask"].astype(bool)
    lines = [f"  regions: {int(mask.sum())} valid of {len(mask)} slots",
             "  slot  valid  label                score   x1     y1     x2     y2"]
    for s in range(len(mask)):
        lab = int(arrays["labels"][s]) if "labels" in arrays else -1
        sc = float(arrays["scores"][s]) if "scores" in arrays else float("nan")
        b = arrays["boxes"][s]
        shown = _label_name(names, lab) if mask[s] else "-"
        lines.append(f"  {s:>4}  {'yes' if mask[s] else 'no':>5}  {shown[:18]:<18} "
                     f"{sc:>6.3f}  {b[0]:.3f}  {b[1]:.3f}  {b[2]:.3f}  {b[3]:.3f}")
    return lines


# ---- integrity ------------------------------------------------------------------------------------

def _manifest_ids(manifest: str | os.PathLike, column: str) -> list[str]:
    table = T.read_manifest(manifest)
    if column not in table.column_names:
        raise InspectError(f"{manifest}: no column {column!r} to compare with (have: {', '.join(table.column_names)})")
    return [str(x) for x in table.column(column).to_pylist()]


def _compare_with_manifest(have: Sequence[str], manifest: str | os.PathLike, column: str) -> list[str]:
    problems = []
    want = _manifest_ids(manifest, column)
    dup = [k for k, c in Counter(want).items() if c > 1]
    if dup:
        problems.append(f"manifest {manifest}: {column} not unique: {_ids_text(dup)}")
    have_set, want_set = set(have), set(want)
    missing = [i for i in want if i not in have_set]
    extra = [i for i in have if i not in want_set]
    if missing:
        problems.append(f"{len(missing)} {column}(s) of {manifest} missing from the cache: {_ids_text(missing)}")
    if extra:
        problems.append(f"{len(extra)} cached id(s) not in {manifest}: {_ids_text(extra)}")
    return problems


# the prepared manifest whose ids each whole cache dir must hold exactly once
MANIFEST_OF_CACHE = {"patches": "images.parquet", "regions": "images.parquet",
                     "text": "samples.parquet", "captions": "captions.parquet"}


def default_manifest(path: str | os.PathLike) -> Path | None:
    """<root>/features/<ds>/<cache> -> <root>/data/prepared/<ds>/<its manifest>, if it exists.

    Only for a whole cache dir of the stages that cache every prepared item (patches,
    regions, text, captions); a single shard or another dir (e.g. ``aligned``, which holds
    the test split only) has no default.
    """
    d = Path(path).resolve()
    name = MANIFEST_OF_CACHE.get(d.name)
    if not d.is_dir() or name is None or d.parent.parent.name != "features":
        return None
    cand = d.parent.parent.parent / "data" / "prepared" / d.parent.name / name
    return cand if cand.exists() else None


def check(path: str | os.PathLike, manifest: str | os.PathLike | None = None) -> list[str]:
    """Integrity problems of the cache at ``path`` (empty list: all good).

    ``manifest``: the prepared manifest whose ids the cache must hold exactly once; pass
    :func:`default_manifest` to use the one beside the cache.
    """
    kind = detect_kind(path)
    fn = {"shards": check_shards, "text": check_text, "captions": check_captions, "table": check_table,
          "checkpoint": check_checkpoint, "folder": check_folder}[kind]
    return fn(Path(path), manifest)


def _duplicates(where: dict[str, list[str]]) -> list[str]:
    return [f"id {i!r} appears {len(w)} times: in {', '.join(w)}" for i, w in where.items() if len(w) > 1]


def check_shards(p: Path, manifest: str | os.PathLike | None = None) -> list[str]:
    """ids unique, shards complete and consistent, every digest verifies, no NaN/inf, region masks consistent with boxes."""
    problems: list[str] = []
    infos = scan_shards(p)
    if p.is_dir():
        idx = [S.shard_index_of(i.path) for i in infos]
        gaps = sorted(set(range(max(idx) + 1)) - set(idx))
        if gaps:
            problems.append(f"shard file(s) missing: {', '.join(S.shard_path(p, g).name for g in gaps)} (extraction not finished?)")
    where: dict[str, list[str]] = defaultdict(list)
    ref: ShardInfo | None = None
    for info in infos:
        name = info.path.name
        if info.error:
            problems.append(f"{name}: {info.error}")
            continue
        if not info.complete:
            problems.append(f"{name}: not marked complete")
        if info.count != len(info.ids):
            problems.append(f"{name}: count attr {info.count} but {len(info.ids)} ids")
        for k, (shape, _, _) in info.layout.items():
            if shape[:1] != (len(info.ids),):
                problems.append(f"{name}: dataset {k!r} has {shape[0] if shape else 0} rows for {len(info.ids)} ids")
        if ref is None:
            ref = info
        else:
            if info.run_fingerprint != ref.run_fingerprint:
                problems.append(f"{name}: fingerprint {info.run_fingerprint[:12]} differs from {ref.path.name}'s "
                                f"{ref.run_fingerprint[:12]} (shards of different runs)")
            lay = {k: (v[0][1:], v[1]) for k, v in info.layout.items()}
            ref_lay = {k: (v[0][1:], v[1]) for k, v in ref.layout.items()}
            if lay != ref_lay:
                problems.append(f"{name}: datasets {lay} differ from {ref.path.name}'s {ref_lay}")
        for i in info.ids:
            where[i].append(name)
        if "" in info.ids:
            problems.append(f"{name}: an empty id")
        problems += _check_shard_values(info)
    problems += _duplicates(where)
    if p.is_dir() and (tmp := S.temp_leftovers(p)):
        problems.append(f"temporary file(s) of an interrupted write: {', '.join(t.name for t in tmp)} "
                        f"(rerun the stage: it resumes and removes them)")
    if manifest is not None:
        problems += _compare_with_manifest([i for info in infos for i in info.ids], manifest, "image_id")
    return problems


def _check_shard_values(info: ShardInfo) -> list[str]:
    """Every dataset against its digest and the float ones for NaN/inf, in one read; then the regions."""
    name, n = info.path.name, len(info.ids)
    nonfinite: dict[str, list[str]] = defaultdict(list)

    def visit(k: str, start: int, block: np.ndarray) -> None:
        if block.dtype.kind != "f" or block.ndim == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(block.sum()):  # fast path: a sum is finite only if every value is
                return
        rows = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        nonfinite[k] += [info.ids[start + r] for r in np.flatnonzero(rows) if start + r < n]

    try:
        problems = [f"{name}: {p}" for p in S.verify_shard(info.path, visit)]
        problems += [f"{name}: {k}: {len(bad)} item(s) with NaN/inf: {_ids_text(bad)}" for k, bad in nonfinite.items() if bad]
        with h5py.File(info.path, "r") as f:
            if {"boxes", "mask"} <= set(f.keys()) and f["mask"].shape[:1] == (n,) and f["boxes"].shape[:1] == (n,):
                try:
                    a = {k: S.read_checked(info.path, f[k]) for k in ("boxes", "mask", "scores") if k in f}
                except S.CorruptShardError:
                    a = None  # already named by the digest check
                if a is not None:
                    problems += _check_regions(name, info.ids, a)
    except Exception as e:
        problems = [f"{name}: cannot read values ({type(e).__name__}: {e})"]
    return problems


def _check_regions(name: str, ids: Sequence[str], a: dict[str, np.ndarray]) -> list[str]:
    """Masked-off slots are all zero; valid boxes have 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1."""
    problems = []
    mask, boxes = a["mask"], a["boxes"].astype(np.float64)  # (N, K), (N, K, 4)
    if mask.dtype != bool:
        problems.append(f"{name}: mask has dtype {mask.dtype}, expected bool")
        mask = mask.astype(bool)
    if boxes.shape[:2] != mask.shape or boxes.shape[-1] != 4:
        return problems + [f"{name}: boxes {boxes.shape} do not match mask {mask.shape} (expected (N, K, 4))"]
    off_nonzero = (~mask) & np.any(boxes != 0, axis=-1)
    if "scores" in a:
        scores = a["scores"].astype(np.float64)
        off_nonzero |= (~mask) & (scores != 0)
    with np.errstate(invalid="ignore"):
        x1, y1, x2, y2 = (boxes[..., j] for j in range(4))
        bad_box = mask & ~((x1 < x2) & (y1 < y2) & (x1 >= 0) & (y1 >= 0) & (x2 <= 1) & (y2 <= 1))
        bad_score = mask & ~((scores >= 0) & (scores <= 1)) if "scores" in a else np.zeros_like(mask)
    for what, m in (("masked-off slot(s) with non-zero box/score", off_nonzero),
                    ("valid slot(s) with a box not 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1", bad_box),
                    ("valid slot(s) with a score outside [0, 1]", bad_score)):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size:
            problems.append(f"{name}: {int(m.sum())} {what} in {rows.size} item(s): {_ids_text([ids[r] for r in rows])}")
    return problems


def _check_table_arrays(t: T.FeatureTable, ids: Sequence[Any]) -> list[str]:
    problems = []
    for name in t.array_names:
        if t.value_dtype(name).kind != "f":
            continue
        rows: list[int] = []
        for start, vals, offsets, _ in t.iter_groups(name):  # one row group at a time
            finite = np.isfinite(vals)
            if finite.all():
                continue
            bad_cum = np.concatenate([[0], np.cumsum(~finite)])
            rows += (start + np.flatnonzero(bad_cum[offsets[1:]] - bad_cum[offsets[:-1]])).tolist()
        if rows:
            problems.append(f"{t.path.name}: {name}: {len(rows)} row(s) with NaN/inf: {_ids_text([ids[r] for r in rows])}")
    return problems


def _key_problems(t: T.FeatureTable, key: str) -> list[str]:
    dup = [k for k, c in Counter(t.columns[key]).items() if c > 1]
    return [f"{t.path.name}: {key} {k!r} appears {c} times" for k, c in Counter(t.columns[key]).items() if c > 1][:MAX_LISTED] + (
        [f"{t.path.name}: ... {len(dup)} duplicated {key}s in all"] if len(dup) > MAX_LISTED else [])


def _verified_table(p: Path, cache: bool) -> tuple[T.FeatureTable | None, list[str]]:
    """``(table, problems)``: the table checked against its digests (None if unreadable or damaged).

    ``cache``: a feature cache, always written with digests, so one without them is a problem
    too (a prepared manifest or another Parquet file may have none).
    """
    try:
        t = T.FeatureTable(p)
    except Exception as e:
        return None, [str(e)]
    if cache and not t.digested:
        return t, [f"{p.name}: {T.NO_DIGEST}; rerun the stage that writes it"]
    bad = t.verify_all()  # every row group of every column (read one row group at a time)
    return (None, bad) if bad else (t, [])


def check_text(p: Path, manifest: str | os.PathLike | None = None) -> list[str]:
    problems: list[str] = []
    tables = {}
    for f in (T.WORDS_FILE, T.TYPE_PROMPTS_FILE, T.STATES_FILE):
        if f == T.STATES_FILE and not (p / f).exists():
            continue
        t, found = _verified_table(p / f, cache=True)
        problems += found
        if t is not None:
            tables[f] = t
    w, tp = tables.get(T.WORDS_FILE), tables.get(T.TYPE_PROMPTS_FILE)
    if w is not None and tp is not None and w.provenance != tp.provenance:
        problems.append(f"{T.WORDS_FILE} and {T.TYPE_PROMPTS_FILE} have different provenance (different runs)")
    inner = None
    if w is not None:
        ids = w.columns["sample_id"]
        problems += _key_problems(w, "sample_id")
        problems += _check_table_arrays(w, ids)
        shapes = w.shapes("feats")
        kept, words = np.asarray(w.columns["n_kept"]), np.asarray(w.columns["n_words"])
        if len(shapes):
            inner = tuple(shapes[0, 1:])
            odd = [ids[r] for r in range(len(ids)) if tuple(shapes[r, 1:]) != inner]
            if odd:
                problems.append(f"{T.WORDS_FILE}: (n_layers, d) differs from {inner} in: {_ids_text(odd)}")
            bad = [ids[r] for r in np.flatnonzero((shapes[:, 0] != kept) | (kept > words) | (kept < 0))]
            if bad:
                problems.append(f"{T.WORDS_FILE}: n_kept inconsistent with feats rows or n_words in: {_ids_text(bad)}")
        if manifest is not None:
            problems += _compare_with_manifest(ids, manifest, "sample_id")
    if tp is not None:
        problems += _key_problems(tp, "type")
        problems += _check_table_arrays(tp, tp.columns["type"])
        odd = [t for r, t in enumerate(tp.columns["type"]) if inner is not None and tuple(tp.shapes("feats")[r]) != inner]
        if odd:
            problems.append(f"{T.TYPE_PROMPTS_FILE}: shape differs from (n_layers, d) = {inner} for: {_ids_text(odd)}")
    return problems


def check_captions(p: Path, manifest: str | os.PathLike | None = None) -> list[str]:
    t, problems = _verified_table(p / T.CAPTIONS_FILE, cache=True)
    if t is None:
        return problems
    ids = t.columns["caption_id"]
    problems += _key_problems(t, "caption_id") + _check_table_arrays(t, ids)
    for name in ("emb", "prompt_emb", "mask_emb"):
        if name not in t.array_names:
            problems.append(f"{T.CAPTIONS_FILE}: no column {name!r}")
        elif len(t) and np.any(t.shapes(name) != t.shapes(name)[0]):
            problems.append(f"{T.CAPTIONS_FILE}: {name} rows have different shapes")
    ents = np.asarray(t.columns.get("n_entities", []))
    if ents.size and ents.min() < 0:
        problems.append(f"{T.CAPTIONS_FILE}: negative n_entities in: {_ids_text([ids[r] for r in np.flatnonzero(ents < 0)])}")
    if manifest is not None:
        problems += _compare_with_manifest(ids, manifest, "caption_id")
    return problems


def check_table(p: Path, manifest: str | os.PathLike | None = None) -> list[str]:
    """A Parquet file: its digests (if it has them) verify, its id column unique, no nulls, no NaN in array columns."""
    t, problems = _verified_table(p, cache=False)
    if t is None:
        return problems
    key = next((c for c in ID_COLUMNS if c in t.columns), None)
    if key is not None:
        problems += _key_problems(t, key)
        if manifest is not None:
            problems += _compare_with_manifest([str(k) for k in t.columns[key]], manifest, key)
    ids = t.columns[key] if key else list(range(t.num_rows))
    for name, vals in t.columns.items():
        nulls = [ids[r] for r, v in enumerate(vals) if v is None]
        if nulls:
            problems.append(f"{p.name}: column {name!r} has {len(nulls)} null(s): {_ids_text(nulls)}")
    return problems + _check_table_arrays(t, ids)


def _load_checkpoint(p: Path) -> dict:
    import torch

    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise InspectError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise InspectError(f"{p}: not an MNER checkpoint (no state_dict); keys: {list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__}")
    return ckpt


def _summary_checkpoint(p: Path) -> str:
    ckpt = _load_checkpoint(p)
    tensors = {k: v for k, v in ckpt["state_dict"].items() if hasattr(v, "shape")}
    n_params = sum(int(v.numel()) for v in tensors.values())
    groups = Counter(k.split(".")[0] for k in tensors)
    lines = [f"{p}: MNER checkpoint, {len(tensors)} tensors, {n_params:,} values, {_fmt_bytes(p.stat().st_size)}",
             "  tensors by module: " + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())),
             "  config:", _indent(_pretty(ckpt.get("config")))]
    if ckpt.get("tags"):
        lines.append(f"  tags: {' '.join(map(str, ckpt['tags']))}")
    lines += ["  meta:", _indent(_pretty(ckpt.get("meta")))]
    return "\n".join(lines)


def check_checkpoint(p: Path, manifest: str | os.PathLike | None = None) -> list[str]:
    """A checkpoint loads (weights only) and holds no NaN or inf."""
    try:
        ckpt = _load_checkpoint(p)
    except InspectError as e:
        return [str(e)]
    bad = [k for k, v in ckpt["state_dict"].items()
           if hasattr(v, "is_floating_point") and v.is_floating_point() and not bool(v.isfinite().all())]
    return [f"{p.name}: non-finite values in {_ids_text(bad)}"] if bad else []


def _summary_folder(p: Path) -> str:
    files = _folder_files(p)
    total = sum(f.stat().st_size for f in files)
    lines = [f"{p}: {len(files)} file(s), {_fmt_bytes(total)}"]
    for f in files[:30]:
        lines.append(f"  {str(f.relative_to(p)):<40} {_fmt_bytes(f.stat().st_size)}")
    if len(files) > 30:
        lines.append(f"  ... {len(files) - 30} more file(s)")
    for f in files:
        if f.suffix in (".parquet", ".pt"):
            lines += ["", summary(f)]
        elif f.suffix == ".json" and f.stat().st_size <= 4096:
            lines += ["", f"{f}:", _indent(f.read_text(encoding="utf-8", errors="replace").strip())]
    return "\n".join(lines)


def check_folder(p: Path, manifest: str | os.PathLike | None = None) -> list[str]:
    """Each Parquet table and checkpoint in the folder passes its own check; JSON files parse."""
    problems: list[str] = []
    for f in _folder_files(p):
        rel = f.relative_to(p)
        if f.suffix in (".parquet", ".pt"):
            try:
                found = check(f)
            except (InspectError, OSError, ValueError) as e:
                found = [str(e)]
            problems += [x if x.startswith((str(rel), f.name)) else f"{rel}: {x}" for x in found]
        elif f.suffix == ".json":
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                problems.append(f"{rel}: not valid JSON ({e})")
    return problems


# ---- drawing -----------------------------------------------------------------------------------------

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def draw_regions(path: str | os.PathLike, item_id: str, out_png: str | os.PathLike,
                 images_manifest: str | os.PathLike | None = None, min_side: int = 0) -> str:
    """Draw image ``item_id`` with its valid region boxes, label names and scores into ``out_png``.

    The PNG has the image's own size (upscaled so its shorter side is ``min_side`` if that
    is larger). Returns a one-line description of what was drawn.
    """
    from PIL import Image, ImageDraw, ImageFont

    from pipeline.artifacts import atomic_path
    from pipeline.data.images import ImagePolicy, load_image
    from pipeline.paths import project_path

    p = Path(path)
    if detect_kind(p) != "shards":
        raise InspectError(f"{p}: --draw needs a regions shard dir (features/<ds>/regions)")
    info = next((i for i in scan_shards(p) if item_id in i.ids), None)
    if info is None:
        raise InspectError(f"{p}: no item with id {item_id!r}")
    if not {"boxes", "mask"} <= set(info.layout):
        raise InspectError(f"{p}: no 'boxes'/'mask' datasets: not a regions cache (have {', '.join(info.layout)})")
    row = info.ids.index(item_id)
    with h5py.File(info.path, "r") as f:
        a = {k: np.asarray(S.read_checked(info.path, f[k], row)) for k in ("boxes", "mask", "labels", "scores") if k in f}

    manifest = Path(images_manifest) if images_manifest else default_manifest(p if p.is_dir() else p.parent)
    if manifest is None:
        raise InspectError("--draw needs --images-manifest data/prepared/<ds>/images.parquet (not found beside the cache)")
    rows = [r for r in T.manifest_rows(manifest, ["image_id", "path"]) if str(r["image_id"]) == item_id]
    if not rows:
        raise InspectError(f"{manifest}: no image {item_id!r}")
    rel = rows[0]["path"]
    loaded = load_image(project_path(rel) if rel else None, ImagePolicy())
    im = loaded.image.copy()
    w, h = im.size
    if min_side and min(w, h) < min_side:
        scale = min_side / min(w, h)
        im = im.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        w, h = im.size
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    names = _category_names(info.provenance or {})
    mask = a["mask"].astype(bool)
    for s in np.flatnonzero(mask):
        x1, y1, x2, y2 = (float(v) for v in a["boxes"][s])
        lab = int(a["labels"][s]) if "labels" in a else -1
        color = PALETTE[lab % len(PALETTE)] if lab >= 0 else PALETTE[0]
        l, t = round(x1 * w), round(y1 * h)
        box = (l, t, max(round(x2 * w) - 1, l), max(round(y2 * h) - 1, t))  # pixel-exact edges
        draw.rectangle(box, outline=color, width=max(1, round(min(w, h) / 200)))
        text = _label_name(names, lab) + (f" {float(a['scores'][s]):.2f}" if "scores" in a else "")
        tx, ty = box[0] + 1, box[1] + 1
        l, t, r, b = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle((l - 1, t - 1, r + 1, b + 1), fill=color)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        im.save(tmp, format="PNG")
    note = f" (image status {loaded.status}: fallback drawn)" if loaded.is_fallback else ""
    return f"drew {int(mask.sum())} region(s) of {item_id!r} on a {w}x{h} image{note} -> {out}"
