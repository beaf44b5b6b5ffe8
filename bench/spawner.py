"""Spawn and time benchmark processes from a small process.

Why a separate process: Linux counts the memory of the process a child was
forked from in the child's ru_maxrss (the old address space's high-water mark
is kept across exec).  The runner holds numpy, images being generated and
results, so its children would all report its size as their peak RSS.  This
spawner imports only the standard library, so what wait4 reports for its
children is theirs (plus a floor of about 10 MiB, this interpreter's size).
It also keeps the fork of a large parent out of the timed region.

Protocol: one JSON request per line on stdin, {"argv": [...], "stdout": path,
"stderr": path, "timeout": seconds}; one JSON answer per line on stdout, {"wall": s, "cpu": s,
"maxrss": bytes, "status": exit code} or {"error": message}.
Run as `python -I -S spawner.py`.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import time

CURRENT = 0  # process group of the running child


def _terminate(signum: int, frame: object) -> None:
    """The runner was interrupted: end the running tool (and what it started)."""
    if CURRENT:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(CURRENT, signal.SIGKILL)
    sys.exit(1)


def spawn(argv: list[str], stdout: str, stderr: str, timeout: float) -> dict[str, object]:
    """Run argv to completion; wall time from spawn to reaped, rusage from wait4.
    A process still running after `timeout` seconds is killed (status -9).
    Each tool runs in its own process group, so that an interrupted run can end
    it with everything it started."""
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out, 1),
        (os.POSIX_SPAWN_DUP2, err, 2),
        (os.POSIX_SPAWN_CLOSE, out),
        (os.POSIX_SPAWN_CLOSE, err),
    ]
    try:
        start = time.perf_counter()
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions, setpgroup=0)
        global CURRENT
        CURRENT = pid
        timer = threading.Timer(timeout, os.killpg, (pid, signal.SIGKILL))
        timer.start()
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        CURRENT = 0
    finally:
        os.close(out)
        os.close(err)
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss": usage.ru_maxrss * 1024,
        "status": os.waitstatus_to_exitcode(status),
    }


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = spawn(
                request["argv"], request["stdout"], request["stderr"], request["timeout"]
            )
        except OSError as exc:
            answer = {"error": f"{request['argv'][0]}: {exc.strerror}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
