"""Text extraction driver of the ``text`` stage: first-sub-word features of every MNER
sample and the entity-type prompt features, in Parquet (``pipeline.stores.tables``),
encoded a chunk at a time and written in row groups as they come; a killed run resumes
from the chunks it finished (``pipeline.stores.parts``).

The run fingerprint hashes the encoder's provenance, the params that shape the features,
the entity types and the samples' tokens; the truncated words are listed in the report.
"""
from __future__ import annotations

import os
import time
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import fingerprint, fingerprint_stream, package_versions
from pipeline.encoders.text import CHUNK_SAMPLES
from pipeline.extract.common import (PACKAGES, ExtractError, features_dir, positive_int, prepared_dir, resolve_device,
                                     setup_torch, write_report)

BASE_TYPES = ("PER", "LOC", "ORG")


def entity_types(tag_lists: Sequence[Sequence[str]], other_tag: str | None) -> list[str]:
    """PER, LOC, ORG, the dataset's other tag, then any further type found in the tags (sorted).

    ``other_tag`` None (plain CoNLL data): only the types found in the tags, sorted.
    """
    types = [] if other_tag is None else list(BASE_TYPES) + [other_tag]
    found = sorted({t.split("-", 1)[1] for tags in tag_lists for t in tags if "-" in t} - set(types))
    return types + found


def _encode_chunk(enc: Any, sample_ids: Sequence[str], tokens: Sequence[Sequence[str]], writers: Sequence[Any],
                  bar: Any, batch_size: int, states_layer: int | None) -> dict[str, Any]:
    """Encode one chunk of samples, add each row to every writer; the chunk's report counts."""
    from pipeline.encoders.text import iter_word_features

    stats: dict[str, Any] = {"n_words": [], "n_kept": [], "empty_words": [], "subwords": 0}
    for sid, sf in zip(sample_ids, iter_word_features(enc, tokens, batch_size=batch_size, states_layer=states_layer,
                                                      chunk=len(tokens), bar=bar)):
        r = {"sample_id": sid, "n_words": sf.n_words, "n_kept": sf.n_kept, "feats": sf.feats}
        if sf.states is not None:
            r["states"], r["first"] = sf.states, sf.first
            stats["subwords"] += len(sf.states)
        for w in writers:
            w.add(r)
        stats["n_words"].append(sf.n_words)
        stats["n_kept"].append(sf.n_kept)
        stats["empty_words"].append(sf.empty_words)
    return stats


def _verify_part(part_dir: Path, provenance: dict, ids: list, stats: dict) -> None:
    """A done part must be this chunk's text cache: its provenance, exactly the chunk's ids, the
    counts of its ``done.json``, and every row group matching its digest."""
    from pipeline.stores.tables import TableError, TextFeatures

    t = TextFeatures(part_dir)
    if t.provenance != provenance:
        raise ValueError("its tables come from another part or run")
    if t.sample_ids != ids:
        raise ValueError("its tables hold other samples than the chunk")
    subwords = int(t.states_table.shapes("states")[:, 0].sum()) if t.states_table is not None else 0
    empty = stats.get("empty_words")
    if (stats.get("n_words") != [t.n_words(s) for s in ids] or stats.get("n_kept") != [t.n_kept(s) for s in ids]
            or stats.get("subwords") != subwords or not isinstance(empty, list) or len(empty) != len(ids)
            or not all(isinstance(e, int) and 0 <= e <= n for e, n in zip(empty, stats["n_words"]))):
        raise ValueError("the counts in its done.json do not match its tables")
    problems = t.table.verify_all() + (t.states_table.verify_all() if t.states_table is not None else [])
    if problems:
        raise TableError("; ".join(problems))


def _replay_part(part_dir: Path, writer: Any) -> None:
    """Add a done part's rows to ``writer`` (the same rows an encoding of its chunk gives)."""
    from pipeline.stores.tables import TextFeatures

    t = TextFeatures(part_dir)
    for sid in t.sample_ids:
        r = {"sample_id": sid, "n_words": t.n_words(sid), "n_kept": t.n_kept(sid), "feats": t.get(sid)}
        if t.has_states:
            r["states"], r["first"] = t.states(sid)
        writer.add(r)


def extract_text(dataset: str, params: Mapping[str, Any], out_dir: str | os.PathLike | None = None,
                 chunk: int = CHUNK_SAMPLES) -> dict[str, Any]:
    """Write ``features/<ds>/text``: first-sub-word features per sample + type-prompt features.

    Streams: ``chunk`` samples at a time are encoded (batched by length inside the chunk) and
    written as they come (row groups), so memory does not grow with the dataset (the manifest
    stays in Arrow form). Resumes: each chunk also goes to a part (``pipeline.stores.parts``),
    so a rerun after a kill encodes only the chunks that were not finished.
    """
    import pyarrow.compute as pc

    from pipeline.data.conll import has_images
    from pipeline.encoders.text import (absolute_layers, check_tune_top, load_text_encoder, prompt_texts,
                                        type_prompt_features, word_stats)
    from pipeline.progress import progress as progress_bar
    from pipeline.stores.parts import ChunkParts
    from pipeline.stores.tables import (FLOAT_DTYPES, TABLE_FORMAT, TextFeaturesWriter, manifest_chunks,
                                        read_manifest)

    t0 = time.perf_counter()
    if dataset not in params["datasets"]:
        raise ExtractError(f"params.yaml: datasets: no dataset named {dataset!r}")
    ds = params["datasets"][dataset]
    if ds["kind"] != "mner":
        raise ExtractError(f"params.yaml: datasets.{dataset}.kind is {ds['kind']!r}; the text stage needs an mner dataset")
    other_tag = str(ds["other_tag"]) if has_images(ds["format"]) else None  # conll: types from the tags
    p = params["text"]
    setup_torch(p.get("threads"))
    batch_size = positive_int(p["batch_size"], "text.batch_size")
    dtype = str(p.get("dtype", "float32"))
    if dtype not in FLOAT_DTYPES:
        raise ExtractError(f"params.yaml: text.dtype: {dtype!r} must be one of {', '.join(FLOAT_DTYPES)}")
    device = resolve_device(p.get("device", "cpu"), "text.device")
    samples = read_manifest(prepared_dir(dataset) / "samples.parquet", ["split", "sample_id", "tokens", "tags"])
    n_samples = samples.num_rows
    enc = load_text_encoder(p, device=device)
    depth = int(enc.model.config.num_hidden_layers)
    tune_top = check_tune_top(p["tune_top"], depth, str(p["model"]))
    states_layer = depth - tune_top if tune_top else None
    absolute = absolute_layers(enc.layers, depth)
    if tune_top and not any(a > depth - tune_top for a in absolute):
        raise ExtractError(f"params.yaml: text.tune_top: {tune_top} tunes the top {tune_top} layer(s), but "
                           f"text.layers {enc.layers} stores none of their outputs; add -1 to text.layers")
    t1 = time.perf_counter()
    tags = samples.column("tags")
    distinct_tags = pc.unique(pc.list_flatten(tags)).to_pylist() if n_samples else []
    types = entity_types([[str(t) for t in distinct_tags if t is not None]], other_tag)
    template = str(p["type_prompt"])
    prompts = type_prompt_features(enc, types, template)
    inputs_sha = fingerprint_stream((sid, tok) for c in manifest_chunks(samples, ["sample_id", "tokens"])
                                    for sid, tok in zip(c["sample_id"], c["tokens"]))
    semantic = {"model": enc.provenance["model"], "layers": enc.layers, "max_length": enc.max_length,
                "type_prompt": template, "tune_top": tune_top, "depth": depth,
                "states_layer": states_layer, "dtype": dtype}
    run_fp = fingerprint("text", enc.provenance, semantic, types, inputs_sha, {"table_format": TABLE_FORMAT})
    provenance = {"stage": "text", "dataset": dataset, "encoder": enc.provenance, "params": semantic,
                  "types": types, "prompts": prompt_texts(enc, types, template),
                  "type_prompt_pooling": "mean over the prompt's own sub-tokens (no [CLS]/[SEP])",
                  "table_format": TABLE_FORMAT,
                  "inputs_sha": inputs_sha, "packages": package_versions(*PACKAGES), "fingerprint": run_fp}
    out = Path(out_dir) if out_dir else features_dir(dataset, "text")
    parts = ChunkParts(out, run_fp, verify=_verify_part)
    n_words = array("i")  # per-sample counts for the report, 4 bytes each (the features are not kept)
    n_kept = array("i")
    empty = array("i")
    n_sub = encoded = 0
    with TextFeaturesWriter(out, prompts, provenance, dtype=dtype) as writer, \
            progress_bar(total=n_samples, desc=f"text {dataset}", unit="sample", mininterval=1.0) as bar:
        for k, c in enumerate(manifest_chunks(samples, ["sample_id", "tokens"], rows=chunk)):
            chunk_sha = fingerprint_stream(zip(c["sample_id"], c["tokens"]))
            stats = parts.load(k, chunk_sha, c["sample_id"])
            if stats is not None:
                _replay_part(parts.path(k), writer)
                bar.update(len(c["sample_id"]))
            else:
                with TextFeaturesWriter(parts.path(k), prompts, parts.provenance(k, chunk_sha), dtype=dtype) as part:
                    stats = _encode_chunk(enc, c["sample_id"], c["tokens"], (writer, part), bar,
                                          batch_size=batch_size, states_layer=states_layer)
                parts.mark_done(k, chunk_sha, stats)
                encoded += len(c["sample_id"])
            n_words.extend(stats["n_words"])
            n_kept.extend(stats["n_kept"])
            empty.extend(stats["empty_words"])
            n_sub += int(stats["subwords"])
    parts.clear()  # the cache is in place: the parts are no longer needed
    seconds = time.perf_counter() - t1
    d, size = enc.hidden_size, 2 if dtype == "float16" else 4
    words_kept = int(sum(n_kept))
    cache = {"words": words_kept, "subwords": n_sub, "dtype": dtype,
             "word_feature_bytes_per_word": size * len(enc.layers) * d,
             "state_bytes_per_subword": size * d if tune_top else 0,
             "bytes_per_word": round((size * len(enc.layers) * d * words_kept + size * d * n_sub) / max(1, words_kept), 1),
             "file_bytes": {f.name: f.stat().st_size for f in sorted(Path(out).glob("*.parquet"))}}
    truncated = []
    i = 0
    for c in manifest_chunks(samples, ["sample_id", "split"]):
        for sid, split in zip(c["sample_id"], c["split"]):
            if n_words[i] > n_kept[i]:
                truncated.append({"sample_id": sid, "split": split, "words": n_words[i], "kept": n_kept[i]})
            i += 1
    report = {"stage": "text", "dataset": dataset, "fingerprint": run_fp, **word_stats(n_words, n_kept, empty),
              "truncated_samples": truncated, "types": types, "layers": enc.layers, "hidden_size": enc.hidden_size,
              "tune_top": tune_top, "states_layer": states_layer, "cache_size": cache,
              "samples_encoded": encoded, **parts.report(), "seconds": round(seconds, 3),
              "samples_per_s": round(encoded / seconds, 3) if seconds > 0 and encoded else 0.0,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    write_report(dataset, report["stage"], report)
    return report
