"""The seed's incremental backup, written faithfully in Python: the baseline we must beat.

The seed (POC v3, `shared/seed/000_*.txt`, `backup_nbd` + `backup_block_device`)
did an incremental backup of one disk like this:

1. spawn `nbdinfo URI --map=qemu:dirty-bitmap:NAME` and read its output line by
   line, matching each line with `m/^\\s*(\\d+)\\s*(\\d+)\\s*(\\d+)/` and skipping
   lines whose type has bit 0 clear (clean); any other line is an error;
2. `qemu-img create -f qcow2 -b PREVIOUS -F qcow2 TARGET SIZE`;
3. attach the target through qemu-nbd (`qemu-nbd -c /dev/nbd15`), and the source
   export through `qemu-nbd -c /dev/nbd0`;
4. for each dirty region, in 4 MiB steps: one synchronous read of the source,
   one synchronous write of the target, then BLKDISCARD of the source range;
5. detach the target (`qemu-nbd -d`), which flushes and closes the image.

There is no nbd kernel module on the benchmark machines, so step 3 talks NBD
from user space instead: python-libnbd reads the source export and writes a
writable qemu-nbd export of the new qcow2 (`pwrite`).  That removes two kernel
block-device hops the seed paid for, so this baseline is, if anything, faster
than the seed was.  The source discard is a trim when the export allows it; our
exports are read-only (as the hypervisor's are for us), so it is skipped, as
the seed's unchecked ioctl was a no-op on them.

This module deliberately does not import dirbackup or numpy: it measures the
seed's approach, not our library.  Usage (prints one JSON line):

    seed_baseline.py parse MAPFILE
    seed_baseline.py incremental --uri URI --bitmap NAME --out OUT.qcow2 --backing BASE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

import nbd

BLOCK_SIZE = 4 * 1024 * 1024  # the seed's `my $block_size = 4 * 1024 * 1024`
LINE = re.compile(rb"^\s*(\d+)\s*(\d+)\s*(\d+)")  # the seed's regex, on bytes like Perl


class SeedError(RuntimeError):
    """What the seed `die`d with."""


def next_dirty_region(lines: Iterable[bytes]) -> Iterator[tuple[int, int]]:
    """The seed's `$next_dirty_region` closure as a generator: one regex match per
    line, clean lines skipped, anything unexpected is fatal."""
    for line in lines:
        m = LINE.match(line)
        if m is None:
            raise SeedError(f"unexpected output from nbdinfo - {line!r}")
        offset, length, kind = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if kind & 0x1 == 0:  # not dirty
            continue
        yield offset, length


def parse_file(path: str) -> dict[str, object]:
    """Workload 5: consume every dirty region of a saved `nbdinfo --map` text."""
    start = time.perf_counter()
    count = total = offsets = 0
    with open(path, "rb") as f:
        for offset, length in next_dirty_region(f):
            count += 1
            total += length
            offsets += offset
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "count": count, "bytes": total, "offset_sum": offsets % (1 << 64)}


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """qemu-nbd -c returns once the device is connected; we poll the socket instead."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SeedError(f"qemu-nbd exited with status {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise SeedError("qemu-nbd did not start")
        time.sleep(0.002)


def incremental(uri: str, bitmap: str, out: str, backing: str) -> dict[str, object]:
    """Workload 3: the seed's incremental backup of one disk, start to finish."""
    start = time.perf_counter()
    # backup_nbd: nbdinfo first, read lazily while copying
    info = subprocess.Popen(
        ["nbdinfo", uri, f"--map=qemu:dirty-bitmap:{bitmap}"], stdout=subprocess.PIPE
    )
    assert info.stdout is not None
    src = nbd.NBD()
    src.connect_uri(uri)  # the seed: qemu-nbd -c /dev/nbd0 nbd:unix:...
    size = src.get_size()
    # backup_block_device
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", out, str(size), "-b", backing, "-F", "qcow2"],
        check=True,
    )
    sock = f"{out}.sock"
    server = subprocess.Popen(["qemu-nbd", "--format=qcow2", f"--socket={sock}", out])
    dirty = 0
    try:
        _wait_for_socket(sock, server)
        dst = nbd.NBD()
        dst.connect_unix(sock)  # the seed: qemu-nbd -c /dev/nbd15 TARGET
        can_trim = src.can_trim()
        for region_offset, region_length in next_dirty_region(info.stdout):
            local = 0
            while local < region_length:
                request = min(region_length - local, BLOCK_SIZE)
                offset = region_offset + local
                buffer = src.pread(request, offset)
                dst.pwrite(buffer, offset)
                if can_trim:  # ioctl($in_fh, BLKDISCARD, ...)
                    src.trim(request, offset)
                local += request
                dirty += request
        dst.flush()  # qemu-nbd -d: flush, disconnect, close the image
        dst.shutdown()
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    src.shutdown()
    if info.wait() != 0:
        raise SeedError(f"nbdinfo exited with status {info.returncode}")
    return {"seconds": time.perf_counter() - start, "bytes": dirty}


def main(argv: list[str]) -> int:
    """Command line for the comparison runner (one measurement per process)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse")
    p.add_argument("mapfile")
    i = sub.add_parser("incremental")
    i.add_argument("--uri", required=True)
    i.add_argument("--bitmap", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--backing", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "parse":
        result = parse_file(args.mapfile)
    else:
        result = incremental(args.uri, args.bitmap, args.out, args.backing)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
