"""Progress bars for the command line: bytes, rate and ETA on one line.

Drawn only when stderr is a terminal; otherwise silent, so that logs and
pipes stay clean.  Callbacks come from the copy engine's progress hook a few
times a second.  A line ends itself when its item is complete (it may be
drawn by a child process, whose bar state the parent never sees); a stream
of unknown length (total 0: a tar archive being written) shows bytes and
rate without a bar.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from dirbackup.copy import CopyStats
from dirbackup.units import human


class ProgressBar:
    """One progress line per item (a disk), redrawn in place."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._item: str | None = None
        self._last = 0.0

    def update(self, item: str, stats: CopyStats) -> None:
        """Redraw the line for `item` (a new item finishes the previous line)."""
        if not self.enabled:
            return
        now = time.monotonic()
        complete = 0 < stats.total_bytes <= stats.done_bytes
        if item == self._item and now - self._last < 0.1 and not complete:
            return
        if self._item is not None and item != self._item:
            self.stream.write("\n")
        self._item = item
        self._last = now
        rate = stats.rate
        if stats.total_bytes <= 0:
            line = f"{item:<16.16} {human(stats.done_bytes):>10} {human(rate):>10}/s\033[K"
        else:
            frac = min(stats.done_bytes / stats.total_bytes, 1.0)
            eta = (stats.total_bytes - stats.done_bytes) / rate if rate > 0 else 0.0
            width = max(10, min(30, shutil.get_terminal_size((80, 20)).columns - 70))
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            line = (
                f"{item:<16.16} [{bar}] {frac * 100:5.1f}% {human(stats.done_bytes):>10} / "
                f"{human(stats.total_bytes):<10} {human(rate):>10}/s ETA {eta:4.0f}s"
            )
        self.stream.write("\r" + line + ("\n" if complete else ""))
        self.stream.flush()
        if complete:
            self._item = None

    def device(self, item: str) -> ProgressCallback:
        """A copy.Progress callback bound to one item."""
        return ProgressCallback(self, item)

    def finish(self) -> None:
        """End the current line, if one is drawn."""
        if self.enabled and self._item is not None:
            self.stream.write("\n")
            self.stream.flush()
        self._item = None


class ProgressCallback:
    """Adapts ProgressBar.update to the engine's one-argument callback."""

    def __init__(self, bar: ProgressBar, item: str) -> None:
        self.bar = bar
        self.item = item

    def __call__(self, stats: CopyStats) -> None:
        self.bar.update(self.item, stats)
