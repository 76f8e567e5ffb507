"""Benchmark: peak memory of the text and caption caches against dataset size (prints figures; not a test).

    python -m bench.text_memory [--sizes 10000 200000] [--random-reads 20000] [--dir DIR]

For each size, synthetic sentences (and captions) are written and read through the real
classes (``pipeline.stores.tables``), each step in its own subprocess, whose peak RSS
(``VmHWM`` from /proc/self/status) is printed:

(a) write: ``write_text_features`` fed by a generator of synthetic rows (the features a
    transformer would give are replaced by random float32: the encoder is not run; the
    stage's own loop, ``pipeline.extract.text``, hands the writer a generator the same way);
    captions: ``CaptionFeaturesWriter`` fed 1024 captions at a time (the captions stage's chunk);
(b) read in file order, every id (``evaluate``'s pattern): ``TextFeatures.get`` +
    ``states`` + ``n_words`` + ``n_kept``; ``CaptionFeatures.get``;
(c) random reads (``train``'s shuffled pattern): ``--random-reads`` ids drawn without
    replacement (all ids if fewer), each read as in (b); the time per read is printed too.
    A random read decodes its row group (about ``ROW_GROUP_BYTES``) unless the LRU holds it.

Synthetic text: 1..19 kept words per sentence (mean 10), 2 layers x 64 floats per word, the
sub-word states (kept words + 2) x 64 (``text.tune_top`` > 0): about 8.5 KB a sentence.
Captions: 4 slots x 64 floats: 2.3 KB a caption. Target: peak RSS within 20 % from the
smallest to the largest size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

L, D, S = 2, 64, 4  # layers, width, caption slots
CAPTION_CHUNK = 1024


def peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss where /proc is missing), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sample_id(i: int) -> str:
    return f"train-{i:07d}"


def text_rows(n: int):
    """A generator of n synthetic samples (deterministic per sample)."""
    import numpy as np

    for i in range(n):
        rng = np.random.default_rng(i)
        k = int(rng.integers(1, 20))
        sub = k + 2
        yield {"sample_id": sample_id(i), "n_words": k, "feats": rng.standard_normal((k, L, D), np.float32),
               "states": rng.standard_normal((sub, D), np.float32), "first": np.arange(1, k + 1, dtype=np.int32)}


def child(args: argparse.Namespace) -> dict:
    import numpy as np

    from pipeline.stores.tables import (CaptionFeatures, CaptionFeaturesWriter, TextFeatures, write_text_features)

    d, n = Path(args.dir), args.n
    t0 = time.perf_counter()
    out: dict = {}
    if args.child == "baseline":
        pass
    elif args.child == "write" and args.kind == "text":
        prompts = {t: np.ones((L, D), np.float32) for t in ("PER", "LOC", "ORG", "OTHER")}
        write_text_features(d, text_rows(n), prompts, {"bench": "text_memory"})
        out["file_mb"] = sum(p.stat().st_size for p in d.glob("*.parquet")) / 1e6
    elif args.child == "write":
        rng = np.random.default_rng(0)
        with CaptionFeaturesWriter(d, {"bench": "text_memory"}) as w:
            for a in range(0, n, CAPTION_CHUNK):
                m = min(CAPTION_CHUNK, n - a)
                w.add([f"cap-{i:07d}" for i in range(a, a + m)], rng.standard_normal((m, D), np.float32),
                      rng.standard_normal((m, S, D), np.float32), rng.standard_normal((m, S, D), np.float32),
                      rng.integers(0, S + 1, m))
        out["file_mb"] = sum(p.stat().st_size for p in d.glob("*.parquet")) / 1e6
    else:
        order = np.arange(n)
        if args.child == "random":
            order = np.random.default_rng(1).permutation(n)[:args.random_reads]
        checksum = 0.0
        if args.kind == "text":
            tf = TextFeatures(d)
            t0 = time.perf_counter()
            for i in order:
                sid = sample_id(int(i))
                f = tf.get(sid)
                st, first = tf.states(sid)
                assert f.shape == (tf.n_kept(sid), L, D) and len(first) == tf.n_words(sid)
                checksum += float(f[0, 0, 0]) + float(st[0, 0])
            out["decoded_row_groups"] = tf.table.decoded + tf.states_table.decoded
        else:
            cf = CaptionFeatures(d)
            t0 = time.perf_counter()
            for i in order:
                c = cf.get(f"cap-{int(i):07d}")
                checksum += float(c["emb"][0]) + float(c["mask_emb"][0, 0])
            out["decoded_row_groups"] = cf.table.decoded
        out["reads"] = int(len(order))
        out["ms_per_read"] = 1e3 * (time.perf_counter() - t0) / max(1, len(order))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_json_child(module: str, *args: str) -> dict:
    """Run ``python -m <module> *args`` (one BLAS thread) in a fresh process, so its peak RSS is
    its own; returns the JSON it prints last."""
    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_child(step: str, kind: str, n: int, d: Path, random_reads: int) -> dict:
    return run_json_child("bench.text_memory", "--child", step, "--kind", kind, "--n", str(n),
                          "--dir", str(d), "--random-reads", str(random_reads))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000])
    ap.add_argument("--random-reads", type=int, default=20_000)
    ap.add_argument("--dir", help="work dir (default: a temp dir, removed at the end)")
    ap.add_argument("--child", choices=["baseline", "write", "read", "random"], help=argparse.SUPPRESS)
    ap.add_argument("--kind", choices=["text", "captions"], default="text", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    from pipeline.stores.tables import CACHE_BYTES, ROW_GROUP_BYTES

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="text_memory."))
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores; "
          f"row groups of ~{ROW_GROUP_BYTES / 2**20:g} MiB, LRU of {CACHE_BYTES >> 20} MiB")
    base = run_child("baseline", "text", 0, root, 0)
    print(f"interpreter + numpy + pyarrow + pipeline.stores.tables alone: {base['peak_rss_mb']:.0f} MB\n")
    print(f"{'cache':<9} {'N':>8} {'file MB':>8} | {'write MB':>8} {'s':>6} | {'read all MB':>11} {'ms/read':>7} | "
          f"{'random MB':>9} {'reads':>6} {'ms/read':>7}")
    results: dict = {}
    try:
        for kind in ("text", "captions"):
            for n in args.sizes:
                d = root / f"{kind}-{n}"
                shutil.rmtree(d, ignore_errors=True)
                w = run_child("write", kind, n, d, 0)
                r = run_child("read", kind, n, d, 0)
                q = run_child("random", kind, n, d, args.random_reads)
                results[(kind, n)] = (w, r, q)
                print(f"{kind:<9} {n:>8} {w['file_mb']:>8.0f} | {w['peak_rss_mb']:>8.0f} {w['seconds']:>6.1f} | "
                      f"{r['peak_rss_mb']:>11.0f} {r['ms_per_read']:>7.3f} | {q['peak_rss_mb']:>9.0f} {q['reads']:>6} "
                      f"{q['ms_per_read']:>7.3f}", flush=True)
                shutil.rmtree(d, ignore_errors=True)
        lo, hi = min(args.sizes), max(args.sizes)
        print(f"\npeak RSS at {hi} / at {lo} (target <= 1.20):")
        for kind in ("text", "captions"):
            a, b = results[(kind, lo)], results[(kind, hi)]
            ratios = [b[j]["peak_rss_mb"] / a[j]["peak_rss_mb"] for j in range(3)]
            print(f"  {kind:<9} write {ratios[0]:.3f}  read all {ratios[1]:.3f}  random reads {ratios[2]:.3f}  "
                  f"-> {'within' if max(ratios) <= 1.2 else 'OVER'} the target")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
