"""Fault injection for the reliability tests: real servers, file systems and
signals, never mocks.

* `NbdKit`: an nbdkit server on a Unix socket with filters (error, delay...).
* `small_tmpfs` / `remount`: a size-limited tmpfs store that fills up, or is
  made read-only under a running backup.
* `cli` / `cli_popen` / `cli_killed_at`: the command line as a subprocess;
  `cli_killed_at` has strace deliver SIGKILL on entry of the Nth call of a
  system call (the call never runs), to crash at exact points.
* `leftovers`, `assert_store_sound`, `store_files`: what a store must look like
  after any fault; `dirty_map` / `bitmap_state`: a guest's persistent bitmap.
* `servers_for`: qemu-nbd and nbdfuse processes still serving a path.
* `python_for_others`: an interpreter and import path an unprivileged user can
  use, also when this checkout lies in a private (0700) directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from guests import STOREID

from dirbackup import copy, extents, nbd, qemu
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.storage import DirectoryStorage

KiB = 1024
MiB = 1024 * KiB
LEFTOVER_MARKS = (".partial", ".tmp-", ".removing-", ".merge-", ".restore-")


# ---------------------------------------------------------------------- nbdkit


class NbdKit:
    """`nbdkit -f -U SOCKET --filter=... PLUGIN ARGS` until stopped (or the test
    process dies: --exit-with-parent).  Any export name is served."""

    def __init__(self, sock: Path, plugin: Sequence[str], filters: Sequence[str] = ()) -> None:
        if shutil.which("nbdkit") is None:
            pytest.skip("nbdkit is not installed")
        self.socket = sock
        pidfile = sock.with_suffix(".pid")
        pidfile.unlink(missing_ok=True)
        self.log = sock.with_suffix(".log")
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile)]
        cmd += [f"--filter={f}" for f in filters]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*cmd, *plugin], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit failed: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.01)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def stop(self) -> None:
        self.kill()
        self.proc.wait()
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> NbdKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def has_nbdkit_filter(name: str) -> bool:
    proc = subprocess.run(
        ["nbdkit", f"--filter={name}", "null", "--version"], capture_output=True, check=False
    )
    return proc.returncode == 0


# ---------------------------------------------------------------------- file systems


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "40M") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (skips without the right to mount)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            remount(path, "rw")
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, mode: str) -> None:
    """Remount a file system read-only ("ro") or read-write ("rw")."""
    proc = _mount("-o", f"remount,{mode}", str(path))
    if proc.returncode != 0:
        raise OSError(f"remount,{mode} {path}: {proc.stderr.strip()}")


def fill(fs: Path, leave: int) -> Path:
    """Fill a file system with one file until `leave` bytes are free."""
    filler = fs / "filler"
    free = shutil.disk_usage(fs).free
    with open(filler, "ab") as f:
        f.write(b"\xa5" * max(0, free - leave))
    return filler


# ---------------------------------------------------------------------- the CLI


def _cmd(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "dirbackup", *map(str, args)]


def cli(
    *args: Any, check: int | None = 0, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The command line as a subprocess; asserts its exit status unless `check` is None."""
    proc = subprocess.run(_cmd(args), capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def backup_args(
    store: object, vmid: object, image: Path, *extra: object, device: str = "drive-scsi0"
) -> list[object]:
    """The arguments of `dirbackup backup` of one disk into a store (storage id STOREID)."""
    return [
        "backup",
        "--store",
        store,
        "--storeid",
        STOREID,
        "--vmid",
        vmid,
        "--disk",
        f"{device}={image}",
        *extra,
    ]


def cli_popen(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_killed_at(
    syscall: str, when: int, *args: Any, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the CLI under strace, which sends SIGKILL on entry of the `when`-th
    call of `syscall` by the main thread: the call never happens, exactly as
    if the process had been killed with kill -9 just before it."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    cmd = [
        "strace",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        f"trace={syscall}",
        "-e",
        f"inject={syscall}:signal=SIGKILL:when={when}",
        *_cmd(args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- the provider


def provider_backup(
    storage: DirectoryStorage,
    vmid: int,
    volumes: dict[str, dict[str, Any]],
    start: int,
    request_size: int = 4 * MiB,
    io_timeout: float | None = None,
) -> BaseException | None:
    """Drive the provider as the hypervisor does; return the error of backup_vm
    (after backup_cleanup(False)), or None after a successful backup."""
    p = DirectoryBackupProvider(
        storage,
        storage.scfg,
        STOREID,
        copy_options=copy.CopyOptions(request_size=request_size, workers=2),
        io_timeout=io_timeout,
    )
    p.job_init(start)
    p.backup_init(vmid, "qemu", start)
    try:
        p.backup_vm(vmid, "# config\n", volumes, {})
    except (OSError, Exception) as exc:
        p.backup_cleanup(vmid, "qemu", False, {"error": str(exc)})
        p.job_cleanup()
        return exc
    p.backup_cleanup(vmid, "qemu", True, {})
    p.job_cleanup()
    return None


# ---------------------------------------------------------------------- store checks


def leftovers(root: Path) -> list[str]:
    """Names in a store that only an interrupted operation leaves behind."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if any(mark in name for mark in LEFTOVER_MARKS):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def volids(storage: DirectoryStorage, vmid: int | None = None) -> list[str]:
    return [v["volid"] for v in storage.list_volumes(vmid)]


def assert_store_sound(storage: DirectoryStorage, vmid: int | None = None) -> list[str]:
    """Every listed backup is complete (has its manifest) and verifies."""
    listed = volids(storage, vmid)
    for volid in listed:
        path = Path(storage.path(volid)[0])
        assert (path / "manifest.json").is_file(), f"{volid} is listed without a manifest"
    bad = [(r.volid, r.problems) for r in storage.verify(vmid=vmid) if not r.ok]
    assert not bad, bad
    return listed


def store_files(storage: DirectoryStorage, vmid: int) -> dict[str, str]:
    """sha256 of every file of every published backup of a guest."""
    out = {}
    gdir = storage.store.guest_dir(vmid)
    for entry in storage.store.backups(vmid):
        for p in sorted(entry.path.iterdir()):
            out[str(p.relative_to(gdir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def previous_info(storage: DirectoryStorage, vmid: int) -> bytes | None:
    path = storage.store.previous_info_path(vmid)
    return path.read_bytes() if path.exists() else None


# ---------------------------------------------------------------------- bitmaps


def store_state(
    storage: DirectoryStorage, vmid: int, image: Path, bitmap: str, sock_dir: Path
) -> tuple[object, ...]:
    """What a failed backup must leave as it found it: previous-info, the
    listed backups, every file of the guest's store and the guest's bitmap."""
    return (
        previous_info(storage, vmid),
        volids(storage),
        store_files(storage, vmid),
        bitmap_state(image, bitmap, sock_dir),
    )


def dirty_map(image: Path, bitmap: str, sock_dir: Path) -> list[tuple[int, int]]:
    """The dirty ranges of a persistent bitmap, read through qemu-nbd."""
    sock = sock_dir / f"bm-{random.randrange(1 << 30):x}.sock"
    with qemu.serve_nbd(image, str(sock), bitmap=bitmap) as server:
        ctx = extents.dirty_bitmap_context(bitmap)
        h = nbd.connect(server.uri, [ctx])
        try:
            rows = extents.dirty(extents.block_status(h, ctx))
        finally:
            nbd.close_all([h])
    return [(int(o), int(n)) for o, n, _ in rows]


def bitmap_state(image: Path, bitmap: str, sock_dir: Path) -> tuple[Any, ...]:
    """(flags, dirty ranges) of a bitmap, or None when the image has none by that name."""
    found = {b["name"]: b for b in qemu.bitmaps(image)}.get(bitmap)
    if found is None:
        return (None,)
    flags = tuple(sorted(found.get("flags", [])))
    if "in-use" in flags:
        return (flags,)
    return (flags, tuple(dirty_map(image, bitmap, sock_dir)))


# ---------------------------------------------------------------------- processes


def servers_for(needle: str) -> list[str]:
    """qemu-nbd / nbdfuse processes whose command line mentions `needle`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        prog = os.path.basename(argv[0].decode(errors="replace"))
        if prog in ("qemu-nbd", "nbdfuse") and needle.encode() in b" ".join(argv):
            out.append(f"{pid} {b' '.join(argv).decode(errors='replace')}")
    return out


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)


def rundirs_of(pid: int, base: Path | None = None) -> list[Path]:
    """The private run directories (sockets, FUSE mount points) process `pid`
    has made in `base` (default: the usual place): those whose owner file
    names it."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(base or qemu.run_base()):
            with contextlib.suppress(OSError):
                owner = Path(entry.path, qemu.OWNER).read_text().split()
                if owner and owner[0] == str(pid):
                    out.append(Path(entry.path))
    return sorted(out)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (only these: other programs' mounts,
    another dirbackup's included, are none of a test's business)."""
    found = []
    prefix = str(path).rstrip("/") + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        for esc, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(esc, char)
        if point == str(path) or point.startswith(prefix):
            found.append(point)
    return found


def _reachable_by_others(path: Path) -> bool:
    """Whether a user who is neither owner nor group can read `path`."""
    path = path.resolve()
    for d in path.parents:
        if not os.stat(d).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def python_for_others(dest: Path) -> tuple[str, list[str]]:
    """(interpreter, sys.path entries) with which another user (nobody)
    imports this dirbackup: the package (its Python files and its compiled
    modules, which an editable install keeps apart) is copied into `dest`, and
    numpy too when the other user could not read it where it is (a checkout
    and its .venv in a 0700 directory, as anything under /root)."""
    import numpy

    import dirbackup

    python = os.path.realpath(sys.executable)
    if not _reachable_by_others(Path(python)):
        pytest.skip(f"{python} cannot be run by other users")
    dest.mkdir(parents=True, exist_ok=True)
    package = Path(dirbackup.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, dest / "dirbackup", ignore=ignore, dirs_exist_ok=True)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.startswith("dirbackup.") and file and Path(file).parent != package:
            shutil.copy2(file, dest / "dirbackup" / Path(file).name)  # compiled modules
    path = [str(dest)]
    numpy_dir = Path(numpy.__file__).parent
    if _reachable_by_others(numpy_dir / "__init__.py"):
        path.append(str(numpy_dir.parent))
    else:  # with the libraries a numpy wheel keeps beside it
        for name in ("numpy", "numpy.libs"):
            if (numpy_dir.parent / name).is_dir():
                shutil.copytree(numpy_dir.parent / name, dest / name, ignore=ignore)
    for dirpath, _dirs, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return python, path


def partial_dirs(storage: DirectoryStorage, vmid: int) -> list[Path]:
    gdir = storage.store.guest_dir(vmid)
    if not gdir.is_dir():
        return []
    return sorted(p for p in gdir.iterdir() if p.name.endswith(".partial"))
