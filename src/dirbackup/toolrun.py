"""Run the container tools (tar, mksquashfs, cp, mount, ...) with their messages in the log.

This module and qemu.py are the only ones that start processes (tests/test_layout.py
keeps it so): qemu.py runs QEMU's and libnbd's programs (qemu-img, qemu-io,
qemu-nbd, nbdfuse), this module every other tool, a quick question to a tool
(`capture`) and a function in a child process that must answer in time
(`call_in_child`).  Whoever needs another process asks one of the two, so
that environment, logging and clean-up are decided in one place.

Why a reader thread per tool: tar and mksquashfs report problems while they work
(a file that changed, an attribute that cannot be stored).  Reading their stderr
only at exit would let the pipe fill and block them, and would hide the messages
from the task log for as long as a backup runs.  Each line goes to the provider's
`log(level, message)` as it arrives, prefixed with the tool's name, and is kept so
that a failure can be reported as one line with the tool's own words.

Tools run with LC_ALL=C: their messages are then stable (we recognise a few) and
file names that are not valid text come out escaped instead of mangled.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from dirbackup.api import LogFunction
from dirbackup.errors import ContainerError, HostError

#: Decides what a tool's message line is: "info", "warn", or None to drop it.
Classifier = Callable[[str], "str | None"]

#: For a Tool's `stdout`: a pipe the caller reads (`Tool.stdout`).
PIPE = subprocess.PIPE

_T = TypeVar("_T")

_logger = logging.getLogger("dirbackup.container")
_LEVELS = {"info": logging.INFO, "warn": logging.WARNING, "err": logging.ERROR}


def resolve_log(log: LogFunction | None) -> LogFunction:
    """The caller's log function, or one that writes to Python logging.

    Tool warnings must go somewhere even when a library user passes no log."""
    if log is not None:
        return log

    def to_logging(level: str, message: str) -> None:
        _logger.log(_LEVELS.get(level, logging.INFO), "%s", message)

    return to_logging


def tool_env() -> dict[str, str]:
    """The environment for tools: ours, with messages in the C locale."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env


def describe_status(returncode: int) -> str:
    """'exit status 2' or 'killed by signal 9 (SIGKILL)'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-returncode} ({name})"
    return f"exit status {returncode}"


def _warn_everything(line: str) -> str | None:
    return "warn"


@dataclass(frozen=True)
class Message:
    """One line a tool wrote, as logged."""

    level: str
    text: str  # prefixed with the tool's name, e.g. "tar: ./x: file changed as we read it"


class Tool:
    """A started tool whose message stream is logged line by line.

    `stdin`/`stdout` are passed to Popen (PIPE, DEVNULL, a file descriptor);
    with `merge_stdout` the tool's stdout is treated as messages too (mksquashfs
    writes some there).  Use as a context manager: leaving the block kills a
    tool that is still running, so no exit path leaves one behind.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log: LogFunction,
        classify: Classifier | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        merge_stdout: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.messages: list[Message] = []
        self._log = log
        self._classify = classify or _warn_everything
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=subprocess.PIPE if merge_stdout else stdout,
                stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE,
                env=tool_env(),
            )
        except FileNotFoundError:
            raise ContainerError(f"{self.argv[0]} is not installed") from None
        except OSError as e:
            raise ContainerError(f"cannot run {self.argv[0]}: {e.strerror or e}") from None
        stream = self.proc.stdout if merge_stdout else self.proc.stderr
        assert stream is not None
        self._reader = threading.Thread(
            target=self._read_messages, args=(stream,), name=f"{name}-messages", daemon=True
        )
        self._reader.start()

    @property
    def stdout(self) -> IO[bytes]:
        """The tool's stdout pipe (only when started with stdout=PIPE)."""
        assert self.proc.stdout is not None
        return self.proc.stdout

    def _read_messages(self, stream: IO[bytes]) -> None:
        prefix = f"{self.name}: "
        for raw in stream:
            line = raw.rstrip(b"\n").decode("utf-8", "backslashreplace").rstrip()
            if not line:
                continue
            while line.startswith(prefix):  # tar and cp name themselves already
                line = line[len(prefix) :]
            level = self._classify(line)
            if level is None:
                continue
            message = Message(level, prefix + line)
            self.messages.append(message)
            self._log(level, message.text)

    def wait(self) -> int:
        """Wait for the tool and for its last message; return its exit status."""
        returncode = self.proc.wait()
        self._reader.join()
        return returncode

    def wait_for(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the tool to exit (it may still run after)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Stop the tool if it still runs (SIGTERM, then SIGKILL) and reap it."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGCONT):  # CONT: it may be paused
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)

    def warnings(self) -> list[str]:
        """The lines logged as warnings, in order."""
        return [m.text for m in self.messages if m.level == "warn"]

    def failure(self, returncode: int, *, ignore: Sequence[str] = ()) -> str:
        """One line saying why the tool failed, in its own words where it gave any.

        The first warning that is not a generic trailer (`ignore` substrings, e.g.
        tar's "Exiting with failure status") is the cause in practice."""
        cause = next(
            (
                m.text
                for m in self.messages
                if m.level == "warn" and not any(s in m.text for s in ignore)
            ),
            None,
        )
        status = describe_status(returncode)
        return f"{self.name} failed ({status})" + (f": {cause}" if cause else "")

    def __enter__(self) -> Tool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def run_tool(
    argv: Sequence[str],
    *,
    name: str,
    log: LogFunction,
    classify: Classifier | None = None,
    ok: Sequence[int] = (0,),
    ignore: Sequence[str] = (),
    merge_stdout: bool = False,
) -> Tool:
    """Run a tool to completion; raise ContainerError unless its status is in `ok`."""
    with Tool(argv, name=name, log=log, classify=classify, merge_stdout=merge_stdout) as tool:
        returncode = tool.wait()
    if returncode not in ok:
        raise ContainerError(tool.failure(returncode, ignore=ignore))
    return tool


def capture(argv: Sequence[str], *, timeout: float) -> bytes | None:
    """What a quick tool writes (stdout, then stderr), e.g. its version; None
    if it cannot be run or does not finish within `timeout` seconds."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout + proc.stderr


def _default_sigterm() -> None:
    """In call_in_child's worker: SIGTERM ends it quietly (the pool ends its
    worker so), not through a handler of ours inherited from the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def call_in_child(function: Callable[..., _T], args: tuple[Any, ...], timeout: float) -> _T:
    """`function(*args)` run in a forked child process, for a call that may hang
    in the kernel (a dead network mount): TimeoutError if it does not answer
    within `timeout` seconds; the child is then killed and the caller goes on.
    `function` must be a module-level function (it is named to the child)."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1, initializer=_default_sigterm) as pool:
        result = pool.apply_async(function, args)
        try:
            value: _T = result.get(timeout)
        except multiprocessing.TimeoutError:
            pool.terminate()
            raise TimeoutError(f"no answer within {timeout:g} s") from None
    return value


_PR_SET_PDEATHSIG = 1


def run_forked(function: Callable[[LogFunction], None], relay: LogFunction) -> None:
    """`function(log)` run in a forked child process, as the hypervisor runs a
    container's backup_container: what it changes in memory stays in the
    child.  The lines it gives `log` reach `relay` here as they come; its
    failure is raised here as a HostError with its one-line message (an
    interruption here stops the child first)."""
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(r)
            # killed with its parent (even by SIGKILL): no orphan keeps writing
            # into the guest's partial backup and holding the guest's lock
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                return
            lock = threading.Lock()

            def send(obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode() + b"\n"
                with lock:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(w, view) :]

            try:
                function(lambda level, message: send({"log": [str(level), str(message)]}))
                status = 0
            except BaseException as exc:
                send({"error": " ".join(str(exc).split()) or type(exc).__name__})
        finally:
            os._exit(status)
    os.close(w)
    error = None
    try:
        with os.fdopen(r, "rb") as lines:
            for line in lines:
                msg = json.loads(line)
                if "log" in msg:
                    relay(msg["log"][0], msg["log"][1])
                elif "error" in msg:
                    error = str(msg["error"])
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if error is not None:
        raise HostError(error)
    if status != 0:
        raise HostError(f"the child process ended with status {os.waitstatus_to_exitcode(status)}")
