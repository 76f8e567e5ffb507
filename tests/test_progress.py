"""Progress output: a bar on a terminal, whole throttled lines in a log or a pipe."""
from __future__ import annotations

import io
import os
import pty

from tqdm import tqdm

from pipeline.progress import LineProgress, progress


def test_a_log_gets_whole_lines_not_carriage_return_frames():
    log = io.StringIO()  # not a terminal, like `dvc repro > log`
    bar = progress(total=500, desc="patches@ds", unit="item", file=log, mininterval=0, leave=False)
    assert isinstance(bar, LineProgress)
    for _ in range(500):
        bar.update(1)
        bar.set_postfix(loss="0.1")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the start and the end (the default interval is 30 s, far longer than this loop)
    assert len(lines) == 2, lines
    assert lines[0].startswith("patches@ds: 0/500 item") and lines[-1].startswith("patches@ds: 500/500 item"), lines


def test_lines_are_throttled_by_the_interval(monkeypatch):
    log = io.StringIO()
    now = [0.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: now[0])
    bar = LineProgress(total=6, desc="x", unit="it", file=log, interval=25, mininterval=0, miniters=1)
    for _ in range(6):  # updates at t = 10, 20, ..., 60
        now[0] += 10
        bar.update(1)
    bar.close()
    counts = [line.split(" ")[1] for line in log.getvalue().splitlines()]
    # the start (t=0), then t=30 (n=3) and t=60 (n=6), each 25 s or more after the last; the
    # end is not repeated since the last line already said 6/6
    assert counts == ["0/6", "3/6", "6/6"], log.getvalue()


def test_disabled_bars_write_nothing():
    log = io.StringIO()
    for _ in progress(range(10), file=log, disable=True):
        pass
    assert log.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as term:
            bar = progress(total=3, file=term)
            assert type(bar) is tqdm
            bar.close()
    finally:
        os.close(master)
