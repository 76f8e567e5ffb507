"""Stage command lines: expected errors are one line with exit status 2, bugs keep their traceback."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import USER_ERROR, run_stage
from pipeline.stores.shards import parse_shard_arg

REPO = Path(__file__).resolve().parents[1]


def _stage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv,message", [
    (["stages.prepare", "nosuch"], "prepare@nosuch: params.yaml: no dataset named 'nosuch' in `datasets`"),
    (["stages.score", "demo_tweets"], "score@demo_tweets: demo_tweets is an mner dataset; score needs a retrieval dataset"),
    (["stages.evaluate", "demo_flickr"], "evaluate@demo_flickr: demo_flickr is a retrieval dataset; evaluate needs an mner"),
    (["stages.rerank", "demo_tweets"], "rerank@demo_tweets: demo_tweets is an mner dataset; rerank needs a retrieval"),
    (["stages.patches", "demo_tweets", "--shard", "5/4"], "patches@demo_tweets: --shard '5/4': INDEX must be in 0..3"),
])
def test_expected_errors_are_one_line_with_exit_status_2(argv, message):
    p = _stage(*argv)
    assert p.returncode == USER_ERROR, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("params: ")]  # override notices
    assert lines == [lines[0]] and lines[0].startswith(message), p.stderr
    assert "Traceback" not in p.stderr


def test_the_debug_switch_shows_the_traceback():
    p = _stage("stages.prepare", "nosuch", "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr and "ParamsError" in p.stderr
    p = _stage("stages.prepare", "nosuch", env={"PIPELINE_DEBUG": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr


@pytest.mark.parametrize("stage", ["prepare", "patches", "regions", "text", "captions", "train", "evaluate",
                                   "retrieve", "rerank", "score", "align_retrieval", "demo"])
def test_help_names_the_module_to_run(stage, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"stages.{stage}").main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: python -m stages.{stage} "), out[:100]


def test_our_value_errors_are_expected_but_a_library_bug_keeps_its_traceback(capsys):
    def ours(argv):
        parse_shard_arg("x")  # raises ValueError inside pipeline/

    assert run_stage("patches", ours, ["demo_tweets"]) == USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("patches@demo_tweets: --shard 'x'") and err.count("\n") == 1

    def bug(argv):
        np.zeros((2, 2)) @ np.zeros((3, 3))  # a ValueError from inside numpy, not a message of ours

    with pytest.raises(ValueError, match="matmul"):
        run_stage("train", bug, ["demo_tweets"])

    def missing(argv):
        open("/nonexistent/input.parquet")

    assert run_stage("train", missing, ["x"]) == USER_ERROR
    assert "train@x: /nonexistent/input.parquet: No such file or directory" in capsys.readouterr().err
