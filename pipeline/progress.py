"""Progress bars that suit where they are written.

On a terminal: a tqdm bar. Anywhere else (``dvc repro > log``, a pipe, a CI log, a job
scheduler's output file) a bar's carriage-return frames fill the file with hundreds of
partial lines, so there the same bar writes plain lines instead: one when it starts, one at
most every ``PIPELINE_PROGRESS_INTERVAL`` seconds (default 30), and one when it ends.
Training prints its own line per epoch either way.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("PIPELINE_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


class LineProgress(tqdm):
    """tqdm that writes whole lines, throttled to one per ``interval`` seconds (plus start and end)."""

    def __init__(self, iterable: Iterable | None = None, *args: Any, interval: float | None = None, **kw: Any) -> None:
        self._line_interval = _interval() if interval is None else interval
        self._last_line, self._last_n = -float("inf"), -1
        kw.setdefault("bar_format", LINE_FORMAT)
        kw["dynamic_ncols"] = False
        super().__init__(iterable, *args, **kw)

    def _line(self, text: str) -> None:
        self._last_line, self._last_n = time.monotonic(), self.n
        self.fp.write(text + "\n")
        self.fp.flush()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line: nothing to clear in a log
            return False
        if time.monotonic() - self._last_line >= self._line_interval:
            self._line(msg if msg is not None else self.__str__())
        return True

    def close(self) -> None:
        if not self.disable and self._last_n != self.n:
            self._line(self.__str__())  # the end, unless the last line already said it
        self.leave = False  # tqdm's own final frame and newline: not in a log
        super().close()


def progress(iterable: Iterable | None = None, **kw: Any) -> tqdm:
    """A progress bar (tqdm's arguments): a tqdm bar on a terminal, :class:`LineProgress` elsewhere."""
    stream = kw.get("file") or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, **kw)
    kw.pop("dynamic_ncols", None)
    return LineProgress(iterable, **kw)
