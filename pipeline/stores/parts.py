"""Resume a killed table-writing stage (``text``, ``captions``) from the chunks it finished.

Parquet writes its row-group index (the footer) only when a file is closed, so a killed
write cannot be continued. Instead the stage cuts its input into fixed chunks (manifest
order) and writes each chunk's rows twice: into the final file (under a temp name, as
always) and into a small complete cache of their own, a *part*:
``<parent>/.<name>.parts/<fingerprint[:16]>/part-KKKKK/`` beside the output dir
``<parent>/<name>``, finished by ``done.json`` (written last: the run fingerprint, the
chunk's input digest and the chunk's report counts). A rerun with the same fingerprint
replays each done part's rows into the final file instead of encoding them again and
encodes the rest, so the cache comes out byte-identical to an uninterrupted run's.

Parts of another fingerprint are deleted when a run starts; all parts are deleted once the
final files are in place. A part without ``done.json`` (killed while writing) is redone; a
part that fails verification is named on stderr, counted in the report and redone. Cost:
while the stage runs, the parts hold a second copy of what is done (freed at the end), and
the bytes are written twice (I/O, small next to encoding). The parts dir is outside the DVC
output (DVC deletes an output before rerunning its stage) and listed in ``.dvcignore``
(``features/<ds>`` is a dependency of ``train``).
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.artifacts import temp_leftovers, write_json

DONE_FILE = "done.json"
PARTS_SUFFIX = ".parts"


def parts_root(out_dir: str | Path) -> Path:
    """``<parent>/.<name>.parts`` for the output dir ``<parent>/<name>``."""
    out = Path(out_dir)
    return out.parent / f".{out.name}{PARTS_SUFFIX}"


Verify = Callable[[Path, dict, list, dict], None]


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class ChunkParts:
    """The parts of one run (``fingerprint``) of a stage writing ``out_dir``; temp files a killed
    run left in ``out_dir`` are removed when it is made.

    ``verify(part_dir, provenance, ids, stats)`` raises if a done part cannot be trusted: its
    tables must carry ``provenance`` (this part of this run), hold exactly the chunk's ``ids``
    in order, agree with the counts ``stats`` of its ``done.json`` and match their digests.
    ``resumed`` counts the parts reused, ``failed`` maps a part's name to why it was redone.
    """

    def __init__(self, out_dir: str | Path, fingerprint: str, verify: Verify) -> None:
        self.root = parts_root(out_dir)
        self.dir = self.root / fingerprint[:16]
        self.fingerprint = fingerprint
        self._verify = verify
        self.resumed = 0
        self.failed: dict[str, str] = {}
        if not self.root.is_dir():
            _remove(self.root)  # a stray file in the way
        else:
            for p in self.root.iterdir():
                if p != self.dir:  # another run's parts: they can never be used
                    _remove(p)
        if self.dir.exists() and not self.dir.is_dir():
            _remove(self.dir)
        for leftover in temp_leftovers(out_dir):  # a killed run's unfinished files (one stage writes this dir)
            leftover.unlink()

    def path(self, k: int) -> Path:
        return self.dir / f"part-{k:05d}"

    def provenance(self, k: int, chunk_sha: str) -> dict[str, Any]:
        """What a part's tables carry as provenance (the final files carry the stage's own)."""
        return {"part_of": self.fingerprint, "chunk": k, "chunk_sha": chunk_sha}

    def load(self, k: int, chunk_sha: str, ids: list) -> dict[str, Any] | None:
        """The counts stored with chunk ``k`` (ids ``ids``) if its part is done for this input and
        verifies, else None (the part, if any, is removed so it can be written again)."""
        p = self.path(k)
        done = p / DONE_FILE
        if not done.is_file():
            _remove(p)  # never started, or killed while writing
            return None
        try:
            meta = json.loads(done.read_text(encoding="utf-8"))
            want = self.provenance(k, chunk_sha)
            if not isinstance(meta, dict) or meta.get("provenance") != want:
                raise ValueError("it was made from other input rows")
            stats = meta.get("stats")
            if not isinstance(stats, dict):
                raise ValueError(f"{DONE_FILE} holds no counts")
            self._verify(p, want, list(ids), stats)
        except Exception as e:  # noqa: BLE001 - any doubt means: compute the chunk again
            why = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            self.failed[p.name] = why
            print(f"resume: {p} cannot be reused ({why}); computing it again", file=sys.stderr)
            _remove(p)
            return None
        self.resumed += 1
        return dict(stats)

    def mark_done(self, k: int, chunk_sha: str, stats: dict[str, Any]) -> None:
        """Record chunk ``k`` as done (after its tables are closed): written last, atomically."""
        write_json(self.path(k) / DONE_FILE, {"provenance": self.provenance(k, chunk_sha), "stats": stats})

    def clear(self) -> None:
        """Delete every part (the final files are in place)."""
        _remove(self.root)

    def report(self) -> dict[str, Any]:
        return {"parts_resumed": self.resumed, "parts_failed_verification": dict(self.failed)}
