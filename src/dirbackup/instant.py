"""Instant access to a restore point: `dirbackup map`.

A disk of a backup is served as a read-only NBD export of its validated
chain, checked as a qemu-img restore is (RestoringProvider.serve_checked:
the chain's layers given to qemu-nbd one by one, every layer's data checked
against its digests first).  With an overlay, a new qcow2 file is made whose
backing is that read-only export (`nbd+unix://`, so QEMU opens none of the
backup's files itself), and the overlay is exported read-write instead: a VM
or qemu-img can run on it at once, its writes go into the overlay, and the
backup is never written.  The overlay's backing exists only while `map`
runs; keep its data with `qemu-img rebase -u` onto a restored disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dirbackup import qemu
from dirbackup.api import LogFunction
from dirbackup.errors import DirbackupError
from dirbackup.storage import DirectoryStorage
from dirbackup.store import BackupId
from dirbackup.toolrun import describe_status


@dataclass
class Mapped:
    """What `map` serves: the export clients use, and the overlay if any."""

    server: qemu.NbdServer
    overlay: Path | None

    @property
    def uri(self) -> str:
        return self.server.uri


@contextlib.contextmanager
def serve(
    storage: DirectoryStorage,
    bid: BackupId,
    device: str,
    socket: Path,
    *,
    overlay: Path | None = None,
    log: LogFunction | None = None,
) -> Iterator[Mapped]:
    """Serve `device` of backup `bid` on `socket` while the context lasts;
    every server is stopped when it ends (however it ends)."""
    if os.path.lexists(socket):
        raise DirbackupError(f"{socket} exists; refused (give a new socket path)")
    if not socket.parent.is_dir():
        raise DirbackupError(f"{socket.parent} is not a directory")
    if overlay is not None and os.path.lexists(overlay):
        raise DirbackupError(f"overlay {overlay} exists; refused (give a new file)")
    provider = storage.new_backup_provider(log)
    servers: list[qemu.NbdServer] = []
    rundir: Path | None = None
    made_overlay = served = False
    try:
        if overlay is None:
            servers.append(provider.serve_checked(bid.volname, device, str(socket), shared=8))
        else:
            rundir = qemu.make_rundir("dirbackup-map-")
            base = provider.serve_checked(bid.volname, device, str(rundir / "nbd.sock"))
            servers.append(base)
            qemu.overlay_create(overlay, base.uri)
            made_overlay = True
            servers.append(
                qemu.start_nbd(overlay, str(socket), export=device, readonly=False, shared=8)
            )
        served = True
        yield Mapped(servers[-1], overlay)
    except BaseException:
        if made_overlay and not served and overlay is not None:  # kept once served
            with contextlib.suppress(OSError):
                overlay.unlink()
        raise
    finally:
        for server in reversed(servers):
            server.stop()
        if rundir is not None:
            shutil.rmtree(rundir, ignore_errors=True)


def wait(mapped: Mapped, poll: float = 0.2) -> None:
    """Serve until Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated, one),
    how a foreground server is meant to end: then return.  DirbackupError if
    the export's server ends by itself."""
    process = mapped.server.process
    try:
        while process is None or process.poll() is None:
            time.sleep(poll)
    except KeyboardInterrupt:
        return
    raise DirbackupError(
        f"qemu-nbd stopped serving {mapped.uri} ({describe_status(process.returncode)})"
    )
