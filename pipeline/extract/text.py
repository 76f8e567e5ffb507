"""Text extraction driver of the ``text`` stage: first-sub-word features of every MNER
sample and the entity-type prompt features, in Parquet (``pipeline.stores.tables``).

The run fingerprint hashes the encoder's provenance, the params that shape the features,
the entity types and the samples' tokens; the truncated words are listed in the report.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import fingerprint, package_versions
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
    """Write ``features/<ds>/text``: first-sub-word features per sample + type-prompt features."""
    from pipeline.data.conll import has_images
    from pipeline.encoders.text import (absolute_layers, check_tune_top, load_text_encoder, prompt_texts,
                                        type_prompt_features, word_features)
    from pipeline.stores.tables import manifest_rows, write_text_features

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
    device = resolve_device(p.get("device", "cpu"), "text.device")
    samples = manifest_rows(prepared_dir(dataset) / "samples.parquet", ["split", "sample_id", "tokens", "tags"])
    enc = load_text_encoder(p, device=device)
    depth = int(enc.model.config.num_hidden_layers)
    tune_top = check_tune_top(p["tune_top"], depth, str(p["model"]))
    states_layer = depth - tune_top if tune_top else None
    absolute = absolute_layers(enc.layers, depth)
    if tune_top and not any(a > depth - tune_top for a in absolute):
        raise ExtractError(f"params.yaml: text.tune_top: {tune_top} tunes the top {tune_top} layer(s), but "
                           f"text.layers {enc.layers} stores none of their outputs; add -1 to text.layers")
    t1 = time.perf_counter()
    wf = word_features(enc, [s["tokens"] for s in samples], batch_size=batch_size, progress=f"text {dataset}",
                       states_layer=states_layer)
    types = entity_types([s["tags"] for s in samples], other_tag)
    template = str(p["type_prompt"])
    prompts = type_prompt_features(enc, types, template)
    seconds = time.perf_counter() - t1
    inputs_sha = fingerprint([(s["sample_id"], s["tokens"]) for s in samples])
    semantic = {"model": enc.provenance["model"], "layers": enc.layers, "max_length": enc.max_length,
                "type_prompt": template, "tune_top": tune_top, "depth": depth,
                "states_layer": states_layer}
    run_fp = fingerprint("text", enc.provenance, semantic, types, inputs_sha)
    provenance = {"stage": "text", "dataset": dataset, "encoder": enc.provenance, "params": semantic,
                  "types": types, "prompts": prompt_texts(enc, types, template),
                  "type_prompt_pooling": "mean over the prompt's own sub-tokens (no [CLS]/[SEP])",
                  "inputs_sha": inputs_sha, "packages": package_versions(*PACKAGES), "fingerprint": run_fp}
    out = Path(out_dir) if out_dir else features_dir(dataset, "text")
    rows = [{"sample_id": s["sample_id"], "n_words": n, "n_kept": k, "feats": f}
            for s, n, k, f in zip(samples, wf.n_words, wf.n_kept, wf.features)]
    if wf.states is not None and wf.first is not None:
        for r, st, first in zip(rows, wf.states, wf.first):
            r["states"], r["first"] = st, first
    write_text_features(out, rows, prompts, provenance)
    d = enc.hidden_size
    n_sub = sum(len(st) for st in wf.states) if wf.states is not None else 0
    cache = {"words": int(sum(wf.n_kept)), "subwords": n_sub,
             "word_feature_bytes_per_word": 4 * len(enc.layers) * d,
             "state_bytes_per_subword": 4 * d if tune_top else 0,
             "bytes_per_word": round((4 * len(enc.layers) * d * sum(wf.n_kept) + 4 * d * n_sub)
                                     / max(1, sum(wf.n_kept)), 1),
             "file_bytes": {f.name: f.stat().st_size for f in sorted(Path(out).glob("*.parquet"))}}
    truncated = [{"sample_id": s["sample_id"], "split": s["split"], "words": n, "kept": k}
                 for s, n, k in zip(samples, wf.n_words, wf.n_kept) if n > k]
    report = {"stage": "text", "dataset": dataset, "fingerprint": run_fp, **wf.stats(),
              "truncated_samples": truncated, "types": types, "layers": enc.layers, "hidden_size": enc.hidden_size,
              "tune_top": tune_top, "states_layer": states_layer, "cache_size": cache,
              "seconds": round(seconds, 3),
              "samples_per_s": round(len(samples) / seconds, 3) if seconds > 0 and samples else 0.0,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    write_report(dataset, report["stage"], report)
    return report
