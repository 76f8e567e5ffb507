"""Ablations of the seed as DVC experiments, and their table.

  python -m stages.ablations --list                      # names and overrides
  python -m stages.ablations --commands --seeds 1 2 3    # the `dvc exp run` lines to launch
  python -m stages.ablations --run --seeds 1 2 3 [--exp full --exp text_only]
  python -m stages.ablations --table [--from-json exp.json] [--out reports/ablations.md]

Each run sets every key any ablation touches (values from the HEAD commit's params.yaml
plus the ablation's overrides), because `dvc exp run` leaves its params in the workspace.
The table is gathered from `dvc exp show --json` (run here unless --from-json is given):
runs are grouped per dataset by the params that shape its MNER scores (dvc.yaml's params of
the stages up to evaluate, less the seed and the speed knobs), each group named by its
ablation; runs of one group with the same train.seed count once (experiments that changed
only retrieval params trained the same model), and cells are mean ± sample standard
deviation over the distinct seeds, with no spread for a single seed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.artifacts import atomic_path
from pipeline.mner.ablations import ABLATIONS, committed_params, exp_run_command, markdown_table, runs_from_exp_show


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    act = ap.add_mutually_exclusive_group(required=True)
    act.add_argument("--list", action="store_true", help="list the ablations and their overrides")
    act.add_argument("--commands", action="store_true", help="print the dvc exp run commands")
    act.add_argument("--run", action="store_true", help="run the experiments one after another")
    act.add_argument("--table", action="store_true", help="gather results into a markdown table")
    ap.add_argument("--exp", action="append", choices=list(ABLATIONS), help="ablations (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="train.seed values")
    ap.add_argument("--queue", action="store_true", help="with --commands/--run: queue instead of running")
    ap.add_argument("--from-json", type=Path, help="a saved `dvc exp show --json` output")
    ap.add_argument("--include-workspace", action="store_true", help="count the workspace results too")
    ap.add_argument("--metrics", nargs="+", default=["test_f1", "valid_f1"], help="score columns")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    names = args.exp or list(ABLATIONS)

    if args.list:
        for n in names:
            print(f"{n:10s} {' '.join(f'{k}={v}' for k, v in ABLATIONS[n].items()) or '(baseline params)'}")
        return 0
    if args.commands or args.run:
        baseline = committed_params()  # every ablation key is set explicitly from HEAD's params
        for n in names:
            for s in args.seeds:
                cmd = exp_run_command(n, s, queue=args.queue, baseline=baseline)
                print(shlex.join(cmd), flush=True)
                if args.run:
                    subprocess.run([sys.executable, "-m", *cmd], check=True)
        return 0

    if args.from_json:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        p = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"dvc exp show --json failed:\n{p.stderr}")
        data = json.loads(p.stdout)
    runs = runs_from_exp_show(data, include_workspace=args.include_workspace)
    if not runs:
        raise SystemExit("no experiment with metrics/<dataset>/mner.json found (run some with --run first)")
    table = markdown_table(runs, args.metrics)
    print(table, end="")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
