"""One console line per stage of a long job, with elapsed time and an ETA.

``Stage("Training MMFace-DiT", index=4, total=10)`` prints ``[4/10] Training MMFace-DiT`` and, as ``update(done,
of, unit)`` is called, rewrites that line in place on a terminal (``412/1000 steps  1m05s  ETA 1m33s``); when the
output is a file or a pipe it prints a new line at most every ``every_s`` seconds instead. ``done(summary)``
ends the line with the stage's wall time. The ETA extrapolates the rate since the first update, so a stage's
start-up (Ray workers, model loading) does not distort it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Stage:
    def __init__(self, title: str, index: int, total: int, stream: TextIO | None = None, every_s: float = 15.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.title = f"[{index}/{total}] {title}"
        self.every_s = every_s
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.printed = 0.0
        self.lock = threading.Lock()  # updates may come from a watcher thread
        self._write(self.title, final=not self.tty)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, done: int, of: int, unit: str = "") -> None:
        with self.lock:
            now = time.perf_counter()
            if self.first is None or done < self.first[1]:
                self.first = (now, done)
            eta = ""
            t0, d0 = self.first
            if done > d0 and of > done:
                eta = f"  ETA {duration((of - done) * (now - t0) / (done - d0))}"
            line = f"{self.title}  {done}/{of}{' ' + unit if unit else ''}  {duration(self.elapsed())}{eta}"
            if self.tty:
                self._write(line)
            elif now - self.printed >= self.every_s or done >= of:
                self.printed = now
                self._write(line, final=True)

    def done(self, summary: str = "") -> float:
        took = self.elapsed()
        with self.lock:
            self._write(f"{self.title}  done in {duration(took)}{'  ' + summary if summary else ''}", final=True)
        return took

    def _write(self, line: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
