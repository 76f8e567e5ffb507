"""Caption extraction driver of the ``captions`` stage (AGREE's EGR inputs): the CLIP text
embedding of each caption, of its entity prompts and of its entity-masked variants, padded
to ``captions.slots``, in Parquet (``pipeline.stores.tables``), written in row groups as the
captions are encoded (a chunk at a time; every distinct string of a chunk is encoded once); a
killed run resumes from the chunks it finished (``pipeline.stores.parts``).
"""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import fingerprint, fingerprint_stream, package_versions
from pipeline.extract.common import (PACKAGES, ExtractError, positive_int, features_dir, prepared_dir,
                                     resolve_device, setup_torch, write_report)


def caption_slot_texts(text: str, entities: Sequence[str], prompt: str, mask_token: str,
                       slots: int) -> tuple[list[str], list[str], int]:
    """AGREE's EGR inputs for one caption: (prompts, masked captions, n_entities).

    Prompts ``prompt.format(entity=e)``; masked captions ``text.replace(e, mask_token)``
    (plain, case-sensitive); both padded with "" or cut to exactly ``slots``;
    ``n_entities`` = real entities kept (<= slots).
    """
    ents = [str(e) for e in entities][:slots]
    try:
        prompts = [prompt.format(entity=e) for e in ents]
    except (KeyError, IndexError, ValueError) as err:
        raise ExtractError(f"params.yaml: captions.prompt: {prompt!r}: only {{entity}} may be used ({err})") from None
    masked = [text.replace(e, mask_token) for e in ents]
    pad = [""] * (slots - len(ents))
    return prompts + pad, masked + pad, len(ents)


def _over_context(bundle: Any, texts: Sequence[str]) -> int | None:
    """How many texts the CLIP tokenizer cuts at its context length (None if it cannot tell)."""
    try:
        ctx = int(bundle.tokenizer.context_length)
        return sum(1 for t in texts if len(bundle.tokenizer.encode(t)) + 2 > ctx)  # + start/end tokens
    except (AttributeError, TypeError):
        return None


CHUNK_CAPTIONS = 1024  # captions encoded and written together: memory holds one chunk's embeddings


def _encode_chunk(bundle: Any, c: Mapping[str, list], writers: Sequence[Any], prompt: str, mask_token: str,
                  slots: int, batch_size: int) -> dict[str, Any]:
    """Encode one chunk of captions (each distinct string once), add it to every writer; its report counts."""
    from pipeline.encoders.clip import encode_texts

    prompt_lists, mask_lists, n_ent = [], [], []
    cut = not_found = 0
    for text, ents in zip(c["text"], c["entities"]):
        ents = list(ents or [])
        p_list, m_list, k = caption_slot_texts(text, ents, prompt, mask_token, slots)
        prompt_lists.append(p_list)
        mask_lists.append(m_list)
        n_ent.append(k)
        cut += max(0, len(ents) - slots)
        not_found += sum(1 for e in ents[:slots] if e not in text)
    texts = c["text"]
    m, dim = len(texts), bundle.embed_dim
    # every distinct string of the chunk is encoded once (sorted: batches do not depend on manifest order)
    unique = sorted(set(texts) | {s for lst in prompt_lists + mask_lists for s in lst})
    emb_u = encode_texts(bundle, unique, batch_size=batch_size).numpy()  # (U, D)
    row = {s: i for i, s in enumerate(unique)}
    emb = emb_u[[row[t] for t in texts]].reshape(m, dim)
    prompt_emb = emb_u[[row[s] for lst in prompt_lists for s in lst]].reshape(m, slots, dim)
    mask_emb = emb_u[[row[s] for lst in mask_lists for s in lst]].reshape(m, slots, dim)
    for w in writers:
        w.add(c["caption_id"], emb, prompt_emb, mask_emb, n_ent)
    return {"cut": cut, "not_found": not_found, "encoded": len(unique), "kept": int(sum(n_ent)),
            "no_entities": sum(1 for x in n_ent if x == 0), "too_long": _over_context(bundle, unique),
            "splits": dict(Counter(c["split"]))}


def _verify_part(part_dir: Path, provenance: dict, ids: list, stats: dict) -> None:
    """A done part must be this chunk's caption cache: its provenance, exactly the chunk's ids,
    the counts of its ``done.json``, and every row group matching its digest."""
    from pipeline.stores.tables import CaptionFeatures, TableError

    c = CaptionFeatures(part_dir)
    if c.provenance != provenance:
        raise ValueError("its table comes from another part or run")
    if c.caption_ids != ids:
        raise ValueError("its table holds other captions than the chunk")
    counts = ("cut", "not_found", "encoded", "kept", "no_entities")
    splits, too_long = stats.get("splits"), stats.get("too_long", "missing")
    if (not all(isinstance(stats.get(k), int) and stats[k] >= 0 for k in counts)
            or stats["kept"] != int(c.n_entities.sum()) or stats["no_entities"] != int((c.n_entities == 0).sum())
            or not (too_long is None or isinstance(too_long, int))
            or not isinstance(splits, dict) or sum(v for v in splits.values() if isinstance(v, int)) != len(ids)):
        raise ValueError("the counts in its done.json do not match its table")
    problems = c.table.verify_all()
    if problems:
        raise TableError("; ".join(problems))


def extract_captions(dataset: str, params: Mapping[str, Any], out_dir: str | os.PathLike | None = None,
                     chunk: int = CHUNK_CAPTIONS) -> dict[str, Any]:
    """Write ``features/<ds>/captions``: emb (N, D), prompt_emb (N, S, D), mask_emb (N, S, D), n_entities (N,).

    Streams: ``chunk`` captions at a time are encoded (each distinct string of the chunk once)
    and written as row groups, so memory does not grow with the dataset. Resumes: each chunk
    also goes to a part (``pipeline.stores.parts``), so a rerun after a kill encodes only the
    chunks that were not finished.
    """
    from pipeline.encoders.clip import load_clip
    from pipeline.progress import progress as progress_bar
    from pipeline.stores.parts import ChunkParts
    from pipeline.stores.tables import (FLOAT_DTYPES, TABLE_FORMAT, CaptionFeatures, CaptionFeaturesWriter,
                                        manifest_chunks, read_manifest)

    t0 = time.perf_counter()
    if dataset not in params["datasets"]:
        raise ExtractError(f"params.yaml: datasets: no dataset named {dataset!r}")
    kind = params["datasets"][dataset]["kind"]
    if kind != "retrieval":
        raise ExtractError(f"params.yaml: datasets.{dataset}.kind is {kind!r}; the captions stage needs a retrieval dataset")
    cp = params["captions"]
    slots = positive_int(cp["slots"], "captions.slots")
    batch_size = positive_int(cp["batch_size"], "captions.batch_size")
    prompt, mask_token = str(cp["prompt"]), str(cp["mask_token"])
    dtype = str(cp.get("dtype", "float32"))
    if dtype not in FLOAT_DTYPES:
        raise ExtractError(f"params.yaml: captions.dtype: {dtype!r} must be one of {', '.join(FLOAT_DTYPES)}")
    setup_torch(params["clip"].get("threads"))
    bundle = load_clip(params["clip"], device=resolve_device(params["clip"].get("device", "cpu")), image_tower=False)
    cols = ["split", "caption_id", "text", "entities"]
    captions = read_manifest(prepared_dir(dataset) / "captions.parquet", cols)
    n = captions.num_rows
    t1 = time.perf_counter()
    inputs_sha = fingerprint_stream((cid, text, list(ents or []))
                                    for c in manifest_chunks(captions, ["caption_id", "text", "entities"])
                                    for cid, text, ents in zip(c["caption_id"], c["text"], c["entities"]))
    semantic = {"prompt": prompt, "mask_token": mask_token, "slots": slots, "padding": "empty string, encoded",
                "dtype": dtype}
    text_prov = {k: v for k, v in bundle.provenance.items() if k != "preprocessing"}
    run_fp = fingerprint("captions", text_prov, semantic, inputs_sha, {"table_format": TABLE_FORMAT})
    provenance = {"stage": "captions", "dataset": dataset, "clip": text_prov, "params": semantic,
                  "embeddings": "open_clip encode_text, projected, not normalised", "table_format": TABLE_FORMAT,
                  "inputs_sha": inputs_sha, "packages": package_versions(*PACKAGES), "fingerprint": run_fp}
    out = Path(out_dir) if out_dir else features_dir(dataset, "captions")
    parts = ChunkParts(out, run_fp, verify=_verify_part)
    totals: Counter = Counter()
    splits: Counter = Counter()
    too_long: int | None = 0
    texts_now = 0  # distinct texts encoded by this run (not replayed from parts)
    with CaptionFeaturesWriter(out, provenance, dtype=dtype) as writer, \
            progress_bar(total=n, desc=f"captions {dataset}", unit="caption", mininterval=1.0) as bar:
        for k, c in enumerate(manifest_chunks(captions, cols, rows=chunk)):
            chunk_sha = fingerprint_stream(zip(c["caption_id"], c["text"], [list(e or []) for e in c["entities"]]))
            stats = parts.load(k, chunk_sha, c["caption_id"])
            if stats is not None:
                done = CaptionFeatures(parts.path(k))
                writer.add(done.caption_ids, done.emb, done.prompt_emb, done.mask_emb, done.n_entities)
            else:
                with CaptionFeaturesWriter(parts.path(k), parts.provenance(k, chunk_sha), dtype=dtype) as part:
                    stats = _encode_chunk(bundle, c, (writer, part), prompt, mask_token, slots, batch_size)
                parts.mark_done(k, chunk_sha, stats)
                totals["captions_encoded"] += len(c["caption_id"])
                texts_now += stats["encoded"]
            over = stats.pop("too_long")
            too_long = None if over is None or too_long is None else too_long + over
            splits.update(stats.pop("splits"))
            totals.update(stats)
            bar.update(len(c["caption_id"]))
    parts.clear()  # the cache is in place: the parts are no longer needed
    seconds = time.perf_counter() - t1
    report = {"stage": "captions", "dataset": dataset, "fingerprint": run_fp, "captions": n,
              "by_split": dict(sorted(splits.items())), "slots": slots, "entities_kept": totals["kept"],
              "entities_cut": totals["cut"], "entities_not_in_caption": totals["not_found"],
              "captions_without_entities": totals["no_entities"],
              "distinct_texts_encoded": totals["encoded"], "texts_over_context_length": too_long,
              "captions_encoded": totals["captions_encoded"], **parts.report(), "seconds": round(seconds, 3),
              "texts_per_s": round(texts_now / seconds, 3) if seconds > 0 else 0.0,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    write_report(dataset, report["stage"], report)
    return report
