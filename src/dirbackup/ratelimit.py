"""Bandwidth limits in bytes per second, for streams we pump and for tools we cannot.

Two users: the tar stream, which our code copies into the archive (the limit sits
in that loop), and mksquashfs, which reads the container itself and cannot be fed
through a pipe without losing fidelity.  For the latter the only honest lever is
the process itself: pause it (SIGSTOP) while its reads run ahead of the budget and
let it continue (SIGCONT) when the budget has caught up.  Its reads are counted by
the kernel in /proc/PID/io (`rchar`: every byte returned by read-like calls).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

#: How far a stream may run ahead of the rate, in seconds' worth of bytes: enough to
#: absorb scheduling noise, small enough that a short archive is visibly limited.
BURST_SECONDS = 0.1


class TokenBucket:
    """A token bucket that may go into debt: `consume` says how long to wait.

    Tokens accrue at `rate` bytes/s up to `burst`.  Taking more than is available
    is allowed (a chunk is already read) and returns the delay that pays the debt
    back, so the long-run rate never exceeds `rate` whatever the chunk sizes.  The
    bucket starts with a full burst, not more: a limit must show even on archives
    smaller than one second of traffic.
    """

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else self.rate * BURST_SECONDS
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def consume(self, amount: int) -> float:
        """Take `amount` bytes; return the seconds to wait before going on (0.0 if none)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def read_bytes_of(pid: int) -> int:
    """Bytes process `pid` has read so far (all its threads), from /proc/PID/io.

    Raises OSError when the kernel does not account I/O per task or the process is
    gone; callers decide whether that is worth a warning.
    """
    with open(f"/proc/{pid}/io", "rb") as f:
        for line in f:
            if line.startswith(b"rchar:"):
                return int(line.split()[1])
    raise OSError(f"/proc/{pid}/io has no rchar line")


class ProcessReadThrottle:
    """Keep a running process's read rate under a limit by pausing it.

    Call `step()` in the loop that waits for the process; it samples the process's
    read counter, charges the bucket, and when the bucket is in debt stops the
    process for that long.  `release()` always leaves the process running (a
    stopped process that is later killed or waited for must be continued first).
    """

    #: How often the counter is sampled while the process runs; the overshoot
    #: between samples is paid back by a longer pause.
    INTERVAL = 0.02

    def __init__(self, pid: int, rate: int, stop_event: threading.Event | None = None) -> None:
        self.pid = pid
        self.bucket = TokenBucket(rate)
        self._seen = read_bytes_of(pid)
        self._stopped = False
        self._wake = stop_event or threading.Event()

    def step(self) -> float:
        """Charge what the process read since the last call; pause it if over budget.

        Returns the time slept (0.0 when under budget).  Raises OSError when the
        process has gone (its counter is no longer readable).
        """
        now = read_bytes_of(self.pid)
        delay = self.bucket.consume(now - self._seen)
        self._seen = now
        if delay <= 0:
            return 0.0
        self._signal(signal.SIGSTOP)
        try:
            self._wake.wait(delay)
        finally:
            self.release()
        return delay

    def release(self) -> None:
        """Let the process run again if this throttle stopped it (idempotent)."""
        if self._stopped:
            self._stopped = False
            self._send(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        self._stopped = True
        self._send(sig)

    def _send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
