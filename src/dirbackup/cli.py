"""The `dirbackup` command line: back up and restore disk images and
container directories into a dirbackup store, and manage the store.

Exit status: 0 on success, 1 with a one-line `error: ...` on stderr for an
operational error (a traceback only with --debug), 2 for usage errors, 130
when interrupted (Ctrl-C, SIGINT), 143 when terminated (SIGTERM); both clean
up the same way.

One module, longer than most (about 880 lines), because each command's
options, help text and handler are read together; what the commands share
and is not about argument parsing lives elsewhere (progress bars in
progress.py, sizes and durations in units.py, the demo in demo.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dirbackup import __version__, compression, timings
from dirbackup.api import VmType
from dirbackup.copy import CopyStats
from dirbackup.errors import DirbackupError, Terminated
from dirbackup.host import Disk, Host, RestoreEngine, duplicate_disks
from dirbackup.progress import ProgressBar
from dirbackup.provider import DirectoryBackupProvider
from dirbackup.storage import DirectoryStorage, PruneError, VerifyResult
from dirbackup.store import (
    DEFAULT_LOCK_TIMEOUT,
    MAX_VMID,
    BackupEntry,
    BackupId,
    StoreProblem,
    future_horizon,
    split_volid,
)
from dirbackup.units import human, parse_rate, parse_seconds
from dirbackup.watchdog import DEFAULT_IO_TIMEOUT

DEFAULT_STOREID = "dirbackup"
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a process Ctrl-C killed
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, likewise for SIGTERM


class UsageError(Exception):
    """A mistake in the command line itself (exit status 2)."""


# ---------------------------------------------------------------------- parsing


def _pair(text: str) -> tuple[str, str]:
    dev, sep, path = text.partition("=")
    if not sep or not dev or not path:
        raise argparse.ArgumentTypeError(f"expected DEV=PATH, got {text!r}")
    return dev, path


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        return parse_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None


def _compress(text: str) -> str:
    try:
        return compression.normalize(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vmid(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= MAX_VMID:
        raise argparse.ArgumentTypeError(f"invalid guest id {text!r} (a positive number)")
    return int(text)


def _json_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per volume on stdout, one a line (fields: see README)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help)."""
    p = argparse.ArgumentParser(
        prog="dirbackup",
        description="Back up QEMU disk images and container directories into a plain "
        "directory (full and incremental qcow2 images, tar or squashfs archives), "
        "and restore them.",
        epilog="Volumes (VOLID) may be written STOREID:backup/100/qemu-1700000000, "
        "backup/100/qemu-1700000000 or 100/qemu-1700000000.",
    )
    _global_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def store_args(sp: argparse.ArgumentParser, locks: bool = False) -> None:
        sp.add_argument(
            "--store",
            required=True,
            metavar="DIR",
            type=Path,
            help="the backup store directory (must exist)",
        )
        sp.add_argument(
            "--storeid",
            default=DEFAULT_STOREID,
            metavar="NAME",
            help=f"storage id used in volume ids (default: {DEFAULT_STOREID})",
        )
        if not locks:
            return
        sp.add_argument(
            "--lock-timeout",
            type=_seconds,
            default=DEFAULT_LOCK_TIMEOUT,
            metavar="SECONDS",
            help="how long to wait while another backup, removal or prune of the same "
            f"guest holds its lock (default: {DEFAULT_LOCK_TIMEOUT:.0f})",
        )

    b = sub.add_parser(
        "backup",
        help="back up a VM's disks or a container's root directory",
        description="Back up a VM (--disk, one per disk: raw or qcow2 image files or block "
        "devices) or a container (--rootfs).  qcow2 disks get a persistent dirty bitmap, so "
        "the next backup only reads what changed.",
    )
    store_args(b, locks=True)
    b.add_argument("--vmid", required=True, type=_vmid, metavar="ID", help="guest id")
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--disk",
        action="append",
        type=_pair,
        metavar="DEV=PATH",
        help="a disk to back up, e.g. drive-scsi0=/var/lib/vm/disk.qcow2",
    )
    what.add_argument(
        "--rootfs", type=Path, metavar="DIR", help="a container's root file system to back up"
    )
    b.add_argument("--config", type=Path, metavar="FILE", help="guest configuration to store")
    b.add_argument("--firewall", type=Path, metavar="FILE", help="firewall config to store")
    b.add_argument(
        "--mode",
        choices=["incremental", "full"],
        default="incremental",
        help="incremental (default; full when there is nothing to build on) or full",
    )
    b.add_argument(
        "--mechanism",
        choices=["nbd", "file-handle"],
        default="nbd",
        help="how disks are read: NBD exports (default) or nbdfuse file handles",
    )
    b.add_argument(
        "--bwlimit",
        type=_rate,
        default=0,
        metavar="RATE",
        help="bandwidth limit per second, with a unit: 50MB (10^6 bytes), 100MiB or 100M "
        "(2^20 bytes); at least 64KiB; 0: none (default)",
    )
    b.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="container: exclude paths matching PATTERN (leading / anchors at "
        "the root); may be repeated",
    )
    b.add_argument(
        "--lxc-mode",
        choices=["tar", "squashfs"],
        default="tar",
        help="container archive format (default: tar)",
    )
    b.add_argument(
        "--io-timeout",
        type=_seconds,
        default=DEFAULT_IO_TIMEOUT,
        metavar="SECONDS",
        help="fail when a disk makes no progress for this long (a server that stopped "
        f"answering; 0: wait for ever; default: {DEFAULT_IO_TIMEOUT:.0f})",
    )
    b.add_argument(
        "--compress",
        type=_compress,
        default=None,
        metavar="none|zstd|zstd:LEVEL",
        help="how disk images store data clusters: zstd-compressed (LEVEL 1 to 19) or as "
        "they are (default: the storage's compress option, "
        f"{compression.DEFAULT_COMPRESS})",
    )
    b.add_argument("--notes", metavar="TEXT", help="notes to attach to the backup")
    b.add_argument("--protected", action="store_true", help="protect the backup from removal")
    _json_option(b)

    ls = sub.add_parser("list", help="list backups")
    store_args(ls)
    ls.add_argument("--vmid", type=_vmid, metavar="ID", help="only this guest")
    ls.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser(
        "restore",
        help="restore disks or a container",
        description="Restore the disks of a VM backup into files or block devices "
        "(missing files are created with the disk's size; existing targets need --force), "
        "or a container backup into a directory.",
    )
    store_args(r)
    r.add_argument("volid", metavar="VOLID")
    rwhat = r.add_mutually_exclusive_group(required=True)
    rwhat.add_argument(
        "--disk",
        action="append",
        type=_pair,
        metavar="DEV=TARGET",
        help="restore disk DEV into TARGET",
    )
    rwhat.add_argument("--rootfs", type=Path, metavar="DIR", help="restore a container into DIR")
    r.add_argument(
        "--format",
        choices=["raw", "qcow2"],
        default="raw",
        help="target format for disks (default: raw)",
    )
    r.add_argument("--force", action="store_true", help="overwrite existing targets")
    r.add_argument(
        "--engine",
        choices=[e.value for e in RestoreEngine],
        default=RestoreEngine.OURS.value,
        help="copy with dirbackup's engine (default; checks every chunk against its digests as "
        "it copies) or with qemu-img convert (the whole backup chain is first read once to "
        "check its digests: one extra read of the backup)",
    )
    _json_option(r)

    v = sub.add_parser(
        "verify",
        help="re-read backups and check digests and chains",
        description="Re-read backups and check every digest, archive and backing chain.  A "
        "backup is only as good as the backups it builds on: a bad base fails every backup "
        "built on it.  A failure is recorded in the backup (shown by list; no incremental is "
        "built on it) until a verify of it succeeds.",
    )
    store_args(v)
    v.add_argument("volid", nargs="?", metavar="VOLID", help="one backup (default: all)")
    v.add_argument("--vmid", type=_vmid, metavar="ID", help="only this guest's backups")
    _json_option(v)

    pr = sub.add_parser(
        "prune",
        help="remove old backups by keep rules",
        description="Keep backups by the hypervisor's rules (newest first: keep-last, then "
        "hourly, daily, weekly, monthly, yearly); protected backups are never removed; a "
        "removed base of a kept incremental is merged into it first; the kept logs of failed "
        "backups older than the oldest backup left are removed too.  A backup stamped more "
        "than a day in the future is kept outside the rules.  A damaged backup is reported "
        "and kept, the rest pruned, and the exit status is 1.",
    )
    store_args(pr, locks=True)
    pr.add_argument("--vmid", required=True, type=_vmid, metavar="ID", help="guest id")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        pr.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N", help=f"keep-{rule}=N")
    pr.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    _json_option(pr)

    rm = sub.add_parser("remove", help="remove one backup (merged into its children first)")
    store_args(rm, locks=True)
    rm.add_argument("volid", metavar="VOLID")
    _json_option(rm)

    n = sub.add_parser("notes", help="show or set a backup's notes")
    store_args(n, locks=True)
    n.add_argument("volid", metavar="VOLID")
    n.add_argument("text", nargs="?", metavar="TEXT", help="new notes ('' clears them)")

    pt = sub.add_parser("protect", help="protect a backup from removal (or --off)")
    store_args(pt, locks=True)
    pt.add_argument("volid", metavar="VOLID")
    pt.add_argument("--off", action="store_true", help="remove the protection")

    mp = sub.add_parser(
        "map",
        help="serve a restore point as an NBD export (instant access)",
        description="Serve one disk of a VM backup as a read-only NBD export on a Unix "
        "socket, in the foreground until Ctrl-C or SIGTERM; the chain is checked first, as "
        "for a restore.  With --overlay, a new qcow2 overlay backed by that export is made "
        "and served read-write instead: a VM or qemu-img can run on it at once, and the "
        "backup is never written.",
    )
    store_args(mp)
    mp.add_argument("volid", metavar="VOLID")
    mp.add_argument("device", metavar="DEV", help="the disk to serve, e.g. drive-scsi0")
    mp.add_argument("--socket", required=True, type=Path, metavar="PATH", help="a new socket")
    mp.add_argument(
        "--overlay", type=Path, metavar="FILE", help="create FILE (qcow2) and serve it read-write"
    )

    mt = sub.add_parser(
        "mount",
        help="mount a backup's file system read-only (file-level restore)",
        description="Mount the file system of a VM backup's disk (a whole-disk file system, "
        "or --partition N of an MBR or GPT disk; journal replay off) or a container "
        "backup's squashfs tree read-only on MOUNTPOINT (an empty directory); it stays "
        "mounted until `dirbackup umount MOUNTPOINT`.  The disk's chain is checked first, "
        "as for a restore.",
    )
    store_args(mt)
    mt.add_argument("volid", metavar="VOLID")
    mt.add_argument("device", metavar="DEV", nargs="?", help="the disk (VM backups)")
    mt.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    mt.add_argument("--partition", type=int, metavar="N", help="mount partition N of the disk")
    um = sub.add_parser("umount", help="unmount what dirbackup mount mounted, helpers and all")
    um.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)

    d = sub.add_parser("demo", help="run a whole backup/restore cycle on generated data")
    d.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where to build the demo (default: a new temporary directory)",
    )
    ps = sub.add_parser(
        "pve-serve",
        help="serve the Proxmox VE Perl plugins (started by them, not by hand)",
        description="The provider process behind PVE::BackupProvider::Plugin::DirBackup and "
        "PVE::Storage::Custom::DirBackupPlugin: JSON requests, one a line, over a Unix "
        "socket (see dirbackup.pveserve).",
    )
    ps.add_argument("--storeid", required=True, metavar="ID", help="the storage id")
    ps.add_argument(
        "--config",
        required=True,
        metavar="JSON",
        help="the storage's section of storage.cfg as a JSON object (at least 'path')",
    )
    where = ps.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, metavar="N", help="serve this connected socket")
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    for command in sub.choices.values():  # global options go before or after the command
        _global_options(command.add_argument_group("global options"), suppress=True)
        command.set_defaults(command_parser=command)  # whose usage a UsageError prints
    return p


def _global_options(group: Any, suppress: bool) -> None:
    """The options of every command, accepted before or after its name.  A
    subcommand's copy has no default (SUPPRESS), so that it only sets what is
    given after the command and never resets what was given before it."""
    default: Any = {"default": argparse.SUPPRESS} if suppress else {}
    group.add_argument("--version", action="version", version=f"dirbackup {__version__}")
    group.add_argument("--debug", action="store_true", help="show tracebacks of errors", **default)
    group.add_argument(
        "-v", "--verbose", action="store_true", help="print the backup log as it goes", **default
    )


# ---------------------------------------------------------------------- helpers


def _storage(args: argparse.Namespace, **opts: str) -> DirectoryStorage:
    store: Path = args.store
    if not store.is_dir():
        raise DirbackupError(
            f"backup store {store} does not exist or is not a directory (create it with mkdir)"
        )
    options: dict[str, object] = {"path": str(store), **opts}
    if getattr(args, "lock_timeout", None) is not None:
        options["lock-timeout"] = args.lock_timeout
    if getattr(args, "io_timeout", None) is not None:
        options["io-timeout"] = args.io_timeout
    if getattr(args, "compress", None) is not None:
        options["compress"] = args.compress
    return DirectoryStorage(args.storeid, options)


def _volid(storage: DirectoryStorage, text: str) -> BackupId:
    storeid, volname = split_volid(text)
    if storeid is not None and storeid != storage.storeid:
        raise DirbackupError(
            f"{text}: storage id {storeid!r} is not this store's "
            f"({storage.storeid!r}; see --storeid)"
        )
    if not volname.startswith("backup/"):
        volname = f"backup/{volname}"
    bid = BackupId.parse(volname)
    storage.store.require(bid)
    return bid


def _config_text(path: Path | None) -> str | None:
    """A --config or --firewall file as given: bytes that are not UTF-8 are
    kept (surrogateescape) and stored byte for byte."""
    if path is None:
        return None
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _emit(obj: dict[str, Any]) -> None:
    """One volume's JSON object, on a line of its own (--json)."""
    print(json.dumps(obj, sort_keys=True), flush=True)


def _devices(pairs: list[tuple[str, str]]) -> dict[str, Path]:
    """--disk DEV=PATH options as a map; a device named twice is a usage error."""
    devices: dict[str, Path] = {}
    for dev, path in pairs:
        if dev in devices:
            raise UsageError(f"device {dev} given twice")
        devices[dev] = Path(path)
    return devices


class _Printer:
    """Log lines to stderr: warnings always, info with --verbose; never errors
    (the command fails with that error and prints it once, as its last line)."""

    def __init__(self, verbose: bool, bar: ProgressBar) -> None:
        self.verbose = verbose
        self.bar = bar

    def __call__(self, level: str, message: str) -> None:
        if level == "info" and not self.verbose:
            return
        if level == "err":  # a failure: in the backup's log; the command prints it once
            return
        self.bar.finish()
        print(f"{level}: {message}" if level != "info" else message, file=sys.stderr)


# ---------------------------------------------------------------------- commands


def cmd_backup(args: argparse.Namespace) -> int:
    storage = _storage(
        args,
        **{
            "vm-backup-mode": args.mode,
            "vm-backup-mechanism": args.mechanism,
            "lxc-backup-mode": args.lxc_mode,
        },
    )
    storage.store.check()
    bar = ProgressBar()
    printer = _Printer(args.verbose, bar)
    host = Host(
        storage,
        storage.storeid,
        log=printer,
        new_provider=lambda log: DirectoryBackupProvider(
            storage, storage.scfg, storage.storeid, log, progress=bar.update
        ),
    )
    config = _config_text(args.config) or ""
    firewall = _config_text(args.firewall)
    try:
        if args.rootfs is not None:
            if args.disk:
                raise UsageError("--disk and --rootfs cannot be combined")
            report = host.backup_container(
                args.vmid,
                args.rootfs,
                config=config,
                firewall=firewall,
                exclude=args.exclude,
                bandwidth_limit=args.bwlimit,
                notes=args.notes,
                protected=args.protected,
            )
        else:
            if args.exclude:
                raise UsageError("--exclude applies to container backups (--rootfs)")
            disks = [Disk(dev, Path(path)) for dev, path in args.disk]
            twice = duplicate_disks(disks)
            if twice is not None:
                raise UsageError(twice)
            report = host.backup_vm(
                args.vmid,
                disks,
                config=config,
                firewall=firewall,
                bandwidth_limit=args.bwlimit,
                notes=args.notes,
                protected=args.protected,
            )
    finally:
        bar.finish()
    bid = storage.backup_id(report.volid)
    manifest = storage.store.read_manifest(bid)
    if args.json:
        records = manifest.disks if manifest is not None else {}
        _emit(
            {
                "volid": report.volid,
                "vmid": bid.vmid,
                "type": bid.vmtype.value,
                "ctime": bid.epoch,
                "seconds": report.seconds,
                "archive-size": report.archive_size,
                "disks": {
                    dev: {
                        "mode": d.mode,
                        "size": d.size,
                        "read": d.dirty_bytes,
                        "written": d.written_bytes,
                    }
                    for dev, d in sorted(records.items())
                },
            }
        )
    elif manifest is not None and manifest.disks:
        size = sum(d.size for d in manifest.disks.values())
        dirty = sum(d.dirty_bytes for d in manifest.disks.values())
        written = sum(d.written_bytes for d in manifest.disks.values())
        modes = ", ".join(f"{dev} {d.mode}" for dev, d in sorted(manifest.disks.items()))
        print(
            f"{report.volid}: {modes}; read {human(dirty)} of {human(size)} "
            f"({100.0 * dirty / max(size, 1):.1f}% dirty), wrote {human(written)}, "
            f"{report.seconds:.2f} s, {human(dirty / max(report.seconds, 1e-9))}/s"
        )
    else:
        print(f"{report.volid}: archive {human(report.archive_size)}, {report.seconds:.2f} s")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    storage = _storage(args)
    rows = storage.list_volumes(args.vmid)
    for row in rows:  # why its last check (verify, restore, merge) failed, if it did
        row["check-failed"] = storage.store.check_failure(storage.backup_id(row["volid"]))
    if args.json:
        keys = (
            "volid",
            "vmid",
            "subtype",
            "ctime",
            "size",
            "format",
            "parent",
            "notes",
            "protected",
            "check-failed",
            "compress",
        )
        print(json.dumps([{k: row[k] for k in keys} for row in rows], indent=1))
        return 0
    if not rows:
        print("no backups", file=sys.stderr)
        return 0
    table = [("VOLID", "TYPE", "CREATED", "SIZE", "PARENT", "PROT", "CHECK", "NOTES")]
    for row in rows:
        parent = row["parent"].split("/")[-1] if row["parent"] else "-"
        note = (row["notes"] or "").splitlines()[0] if row["notes"] else ""
        table.append(
            (
                row["volid"],
                row["subtype"],
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ctime"])),
                human(row["size"]),
                parent,
                "yes" if row["protected"] else "",
                "FAILED" if row["check-failed"] else "",
                note[:40],
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    storage = _storage(args)
    bid = _volid(storage, args.volid)
    bar = ProgressBar()
    host = Host(storage, storage.storeid, log=_Printer(args.verbose, bar), progress=bar.update)
    volid = bid.volid(storage.storeid)
    if args.rootfs is not None:
        if bid.vmtype != VmType.LXC:
            raise UsageError(f"{volid} is a VM backup: restore it with --disk DEV=TARGET")
        seconds = host.restore_container(volid, args.rootfs, force=args.force)
        if args.json:
            _emit({"volid": volid, "rootfs": str(args.rootfs), "seconds": seconds})
        else:
            print(f"{volid}: restored into {args.rootfs} in {seconds:.2f} s")
        return 0
    if bid.vmtype != VmType.QEMU:
        raise UsageError(f"{volid} is a container backup: restore it with --rootfs DIR")
    targets = _devices(args.disk)
    try:
        report = host.restore_vm(
            volid,
            targets,
            target_format=args.format,
            engine=RestoreEngine(args.engine),
            force=args.force,
        )
    finally:
        bar.finish()
    total = sum(s.done_bytes for s in report.devices.values() if s is not None)
    if args.json:
        done = {d: s.done_bytes for d, s in report.devices.items() if s is not None}
        _emit(
            {
                "volid": volid,
                "seconds": report.seconds,
                "disks": {
                    dev: {
                        "target": str(target),
                        "bytes": done.get(dev),
                    }
                    for dev, target in targets.items()
                },
            }
        )
        return 0
    print(
        f"{volid}: restored {', '.join(f'{d} -> {t}' for d, t in targets.items())} "
        f"in {report.seconds:.2f} s"
        + (f", {human(total / max(report.seconds, 1e-9))}/s" if total else "")
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage = _storage(args)
    if args.volid is not None:
        bid = _volid(storage, args.volid)
        results = storage.verify(bid.volname)
    else:
        problems: list[StoreProblem] = []
        entries = storage.store.backups(args.vmid, problems)
        results = [VerifyResult(str(p.path), False, (p.message,)) for p in problems]
        results += _verify_entries(storage, entries)
    failed = 0
    for r in results:
        if args.json:
            failed += not r.ok
            _emit(
                {
                    "volid": r.volid,
                    "ok": r.ok,
                    "checked-bytes": r.checked_bytes,
                    "problems": list(r.problems),
                }
            )
        elif r.ok:
            print(f"{r.volid}: ok ({human(r.checked_bytes)} checked)")
        else:
            failed += 1
            print(f"{r.volid}: FAILED")
            for problem in r.problems:
                print(f"  {problem}")
    if not results:  # nothing checked is not a success: a wrong --vmid or --store
        whose = f"of guest {args.vmid} " if args.vmid is not None else ""
        raise DirbackupError(f"no backups {whose}to verify in {args.store}")
    if failed:
        print(f"error: {failed} of {len(results)} backups failed verification", file=sys.stderr)
        return 1
    return 0


def _verify_entries(storage: DirectoryStorage, entries: list[BackupEntry]) -> list[VerifyResult]:
    """Verify backups in turn (a base shared by many is read once), with one
    bar per disk on a terminal ("VMID/DEVICE": bytes read of its chain, rate,
    ETA; a layer already checked for another backup is not read again, so a
    bar can jump to its end), and one for each backup's files."""
    bar = ProgressBar()
    started: dict[str, float] = {}

    def checked(item: str, done: int, total: int) -> None:
        start = started.setdefault(item, time.monotonic())
        stats = CopyStats(total, done, done, 0, 0, 0, time.monotonic() - start, 1)
        bar.update(item, stats)

    verifier = storage.verifier(checked)
    results = []
    for entry in entries:
        started.clear()  # the next backup's disks are new bars
        results.append(verifier.verify(entry))
    bar.finish()
    return results


def cmd_prune(args: argparse.Namespace) -> int:
    storage = _storage(args)
    rules = {
        f"keep-{r}": getattr(args, f"keep_{r}")
        for r in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
    }
    if any(v < 0 for v in rules.values()):
        raise UsageError("keep counts must not be negative")
    if not any(rules.values()):
        raise UsageError("give at least one --keep-* option (prune keeps everything otherwise)")
    printer = _Printer(args.verbose, ProgressBar(enabled=False))

    def log(level: str, message: str) -> None:
        if level != "err":  # failures: each printed once, as an error line, below
            printer(level, message)

    try:
        entries = storage.prune_backups(
            {k: v for k, v in rules.items() if v}, vmid=args.vmid, dryrun=args.dry_run, log=log
        )
    except PruneError as exc:  # the rest was pruned: show the marks, then each failure
        _print_marks(exc.entries, args.json)
        for failure in exc.failures:
            print(f"error: prune: {failure}", file=sys.stderr)
        return 1
    _print_marks(entries, args.json)
    if args.json:
        return 0
    removed = sum(1 for e in entries if e["mark"] == "remove")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} of {len(entries)} backups", file=sys.stderr)
    return 0


def _print_marks(entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for e in entries:
            _emit(e)
        return
    horizon = future_horizon()
    for e in entries:
        future = " (stamped in the future)" if e["ctime"] > horizon else ""
        print(f"{e['volid']}  {e['mark']}{future}")


def cmd_remove(args: argparse.Namespace) -> int:
    storage = _storage(args)
    bid = _volid(storage, args.volid)
    children = storage.children_of(bid)
    storage.free_image(bid.volname, log=_Printer(args.verbose, ProgressBar(enabled=False)))
    if args.json:
        merged_into = [c.id.volid(storage.storeid) for c in children]
        _emit({"volid": bid.volid(storage.storeid), "removed": True, "merged-into": merged_into})
        return 0
    merged = f" (merged into {', '.join(c.id.archive for c in children)})" if children else ""
    print(f"removed {bid.volid(storage.storeid)}{merged}")
    return 0


def cmd_notes(args: argparse.Namespace) -> int:
    storage = _storage(args)
    bid = _volid(storage, args.volid)
    if args.text is None:
        print(storage.get_volume_attribute(bid.volname, "notes") or "")
    else:
        storage.update_volume_attribute(bid.volname, "notes", args.text)
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    storage = _storage(args)
    bid = _volid(storage, args.volid)
    storage.update_volume_attribute(bid.volname, "protected", 0 if args.off else 1)
    print(f"{bid.volid(storage.storeid)}: {'not ' if args.off else ''}protected")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from dirbackup import instant

    storage = _storage(args)
    bid = _volid(storage, args.volid)
    if bid.vmtype != VmType.QEMU:
        raise UsageError(f"{bid.volid(storage.storeid)} is a container backup: use mount")
    printer = _Printer(args.verbose, ProgressBar(enabled=False))
    with instant.serve(
        storage, bid, args.device, args.socket, overlay=args.overlay, log=printer
    ) as mapped:
        what = f"overlay {args.overlay} (read-write)" if args.overlay else "read-only"
        print(mapped.uri, flush=True)
        print(f"serving {args.device} of {args.volid} {what}; Ctrl-C stops", file=sys.stderr)
        instant.wait(mapped)  # until Ctrl-C or SIGTERM
    print(f"stopped serving {mapped.uri}", file=sys.stderr)
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from dirbackup import fsmount

    storage = _storage(args)
    bid = _volid(storage, args.volid)
    if bid.vmtype == VmType.LXC and args.device is not None:
        raise UsageError(f"{bid.volid(storage.storeid)} is a container backup: give no DEV")
    if args.partition is not None and (bid.vmtype == VmType.LXC or args.partition < 1):
        raise UsageError("--partition takes a partition number (1 or more) of a VM's disk")
    printer = _Printer(args.verbose, ProgressBar(enabled=False))
    print(
        fsmount.mount(
            storage, bid, args.device, args.mountpoint, partition=args.partition, log=printer
        )
    )
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from dirbackup import fsmount

    print(fsmount.umount(args.mountpoint, _Printer(args.verbose, ProgressBar(enabled=False))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dirbackup.demo import run_demo

    return run_demo(main, args.workdir)


def cmd_pve_serve(args: argparse.Namespace) -> int:
    from dirbackup import pveserve

    try:
        scfg = json.loads(args.config)
    except ValueError as exc:
        raise UsageError(f"--config is not JSON: {exc}") from None
    if not isinstance(scfg, dict):
        raise UsageError("--config must be a JSON object")
    if args.fd is not None:
        pveserve.serve_fd(args.storeid, scfg, args.fd)
    else:
        pveserve.serve_socket(args.storeid, scfg, args.socket)
    return 0


COMMANDS = {
    "backup": cmd_backup,
    "list": cmd_list,
    "restore": cmd_restore,
    "verify": cmd_verify,
    "prune": cmd_prune,
    "remove": cmd_remove,
    "notes": cmd_notes,
    "protect": cmd_protect,
    "map": cmd_map,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "demo": cmd_demo,
    "pve-serve": cmd_pve_serve,
}


def _terminate_like_ctrl_c() -> Callable[[], None]:
    """Make SIGTERM raise Terminated (a KeyboardInterrupt) in the main thread,
    so that a backup or restore stopped by a service manager or `kill` cleans
    up as after Ctrl-C.  Later SIGTERMs are ignored while that cleanup runs
    (it is bounded; SIGKILL still stops everything).  Returns the undo."""
    seen = False

    def handler(signum: int, frame: object) -> None:
        nonlocal seen
        if not seen:
            seen = True
            raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called by a program)
        return lambda: None

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dirbackup` program."""
    timings.begin()
    parser = build_parser()
    args = parser.parse_args(argv)
    undo = _terminate_like_ctrl_c()
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:  # as argparse reports a mistake: the command's usage, then one line
        command: argparse.ArgumentParser = getattr(args, "command_parser", parser)
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("\nerror: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DirbackupError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        undo()
        timings.report()


def _one_line(exc: BaseException) -> str:
    text = (
        str(exc)
        if not isinstance(exc, OSError) or not exc.strerror
        else (
            f"{exc.strerror}"
            + (
                f": {exc.filename}"
                if exc.filename and str(exc.filename) not in exc.strerror
                else ""
            )
        )
    )
    return " ".join(text.split()) or type(exc).__name__
