"""Caption extraction driver of the ``captions`` stage (AGREE's EGR inputs): the CLIP text
embedding of each caption, of its entity prompts and of its entity-masked variants, padded
to ``captions.slots``, in Parquet (``pipeline.stores.tables``), written in row groups as the
captions are encoded (a chunk at a time; every distinct string of a chunk is encoded once).
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


def extract_captions(dataset: str, params: Mapping[str, Any], out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``features/<ds>/captions``: emb (N, D), prompt_emb (N, S, D), mask_emb (N, S, D), n_entities (N,).

    Streams: ``CHUNK_CAPTIONS`` captions at a time are encoded (each distinct string of the
    chunk once) and written as row groups, so memory does not grow with the dataset.
    """
    from pipeline.encoders.clip import encode_texts, load_clip
    from pipeline.progress import progress as progress_bar
    from pipeline.stores.tables import (FLOAT_DTYPES, TABLE_FORMAT, CaptionFeaturesWriter, manifest_chunks,
                                        read_manifest)

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
    bundle = load_clip(params["clip"], device=resolve_device(params["clip"].get("device", "cpu")))
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
    splits: Counter = Counter()
    kept = cut = not_found = no_entities = encoded = 0
    too_long: int | None = 0
    dim = bundle.embed_dim

    with CaptionFeaturesWriter(out, provenance, dtype=dtype) as writer, \
            progress_bar(total=n, desc=f"captions {dataset}", unit="caption", mininterval=1.0) as bar:
        for c in manifest_chunks(captions, cols, rows=CHUNK_CAPTIONS):
            prompt_lists, mask_lists, n_ent = [], [], []
            for text, ents in zip(c["text"], c["entities"]):
                ents = list(ents or [])
                p_list, m_list, k = caption_slot_texts(text, ents, prompt, mask_token, slots)
                prompt_lists.append(p_list)
                mask_lists.append(m_list)
                n_ent.append(k)
                cut += max(0, len(ents) - slots)
                not_found += sum(1 for e in ents[:slots] if e not in text)
            texts = c["text"]
            m = len(texts)
            # every distinct string of the chunk is encoded once (sorted: batches do not depend on manifest order)
            unique = sorted(set(texts) | {s for lst in prompt_lists + mask_lists for s in lst})
            emb_u = encode_texts(bundle, unique, batch_size=batch_size).numpy()  # (U, D)
            row = {s: i for i, s in enumerate(unique)}
            emb = emb_u[[row[t] for t in texts]].reshape(m, dim)
            prompt_emb = emb_u[[row[s] for lst in prompt_lists for s in lst]].reshape(m, slots, dim)
            mask_emb = emb_u[[row[s] for lst in mask_lists for s in lst]].reshape(m, slots, dim)
            writer.add(c["caption_id"], emb, prompt_emb, mask_emb, n_ent)
            over = _over_context(bundle, unique)
            too_long = None if over is None or too_long is None else too_long + over
            encoded += len(unique)
            kept += int(sum(n_ent))
            no_entities += sum(1 for x in n_ent if x == 0)
            splits.update(c["split"])
            bar.update(m)
    seconds = time.perf_counter() - t1
    report = {"stage": "captions", "dataset": dataset, "fingerprint": run_fp, "captions": n,
              "by_split": dict(sorted(splits.items())), "slots": slots, "entities_kept": kept,
              "entities_cut": cut, "entities_not_in_caption": not_found,
              "captions_without_entities": no_entities,
              "distinct_texts_encoded": encoded, "texts_over_context_length": too_long,
              "seconds": round(seconds, 3), "texts_per_s": round(encoded / seconds, 3) if seconds > 0 else 0.0,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    write_report(dataset, report["stage"], report)
    return report
