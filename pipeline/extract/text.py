"""Text extraction driver of the ``text`` stage: first-sub-word features of every MNER
sample and the entity-type prompt features, in Parquet (``pipeline.stores.tables``),
encoded a chunk at a time and written in row groups as they come.

The run fingerprint hashes the encoder's provenance, the params that shape the features,
the entity types and the samples' tokens; the truncated words are listed in the report.
"""
from __future__ import annotations

import os
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import fingerprint, fingerprint_stream, package_versions
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


def extract_text(dataset: str, params: Mapping[str, Any], out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``features/<ds>/text``: first-sub-word features per sample + type-prompt features.

    Streams: samples are encoded a chunk at a time and written as they come (row groups), so
    memory does not grow with the dataset (the manifest stays in Arrow form).
    """
    import pyarrow.compute as pc

    from pipeline.data.conll import has_images
    from pipeline.encoders.text import (absolute_layers, check_tune_top, iter_word_features, load_text_encoder,
                                        prompt_texts, type_prompt_features, word_stats)
    from pipeline.stores.tables import FLOAT_DTYPES, TABLE_FORMAT, manifest_chunks, read_manifest, write_text_features

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
    n_words = array("i")  # per-sample counts for the report, 4 bytes each (the features are not kept)
    n_kept = array("i")
    empty = array("i")
    n_sub = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal n_sub
        ids = (sid for c in manifest_chunks(samples, ["sample_id"]) for sid in c["sample_id"])
        toks = (tok for c in manifest_chunks(samples, ["tokens"]) for tok in c["tokens"])
        for sid, sf in zip(ids, iter_word_features(enc, toks, batch_size=batch_size, progress=f"text {dataset}",
                                                   states_layer=states_layer, total=n_samples)):
            n_words.append(sf.n_words)
            n_kept.append(sf.n_kept)
            empty.append(sf.empty_words)
            r = {"sample_id": sid, "n_words": sf.n_words, "n_kept": sf.n_kept, "feats": sf.feats}
            if sf.states is not None:
                r["states"], r["first"] = sf.states, sf.first
                n_sub += len(sf.states)
            yield r

    write_text_features(out, rows(), prompts, provenance, dtype=dtype)
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
              "seconds": round(seconds, 3),
              "samples_per_s": round(n_samples / seconds, 3) if seconds > 0 and n_samples else 0.0,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    write_report(dataset, report["stage"], report)
    return report
