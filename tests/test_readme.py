"""The README's copy-engine example runs as printed.

The example is taken from README.md itself (the ```python block under "the
copy engine"), with only its socket path and store directory pointed at this
test's files, so the README cannot drift from the API without this failing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import MiB, assert_same

from dirbackup import qemu

README = Path(__file__).resolve().parent.parent / "README.md"
BITMAP = "dirbackup-backups"


def readme_example(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no python example after {heading!r}"
    return m.group(1)


def test_copy_engine_example(
    tmp_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a guest disk with a persistent bitmap, a full backup of it taken when
    # the bitmap was made, then changes the bitmap records
    guest = tmp_path / "guest.qcow2"
    qemu.img_create(guest, 64 * MiB)
    qemu.io(guest, "write -P 0x11 0 8M", "write -P 0x12 40M 3M")
    gdir = tmp_path / "srv" / "backups" / "100"
    base = gdir / "qemu-1700000000" / "drive-scsi0.qcow2"
    base.parent.mkdir(parents=True)
    qemu.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(guest), str(base)])
    qemu.bitmap(guest, "add", BITMAP)
    qemu.io(guest, "write -P 0x21 1M 100k", "write -z 41M 64k", "write -P 0x22 63M 1M")
    socket = sock_dir / "nbd.sock"
    server = qemu.start_nbd(guest, str(socket), export="drive-scsi0", bitmap=BITMAP)
    try:
        code = readme_example("## For integrators: the copy engine")
        assert "/run/nbd.sock" in code and "/srv/backups/100" in code
        code = code.replace("/run/nbd.sock", str(socket)).replace("/srv/backups/100", str(gdir))
        workdir = gdir / "qemu-1700000001"
        workdir.mkdir()
        monkeypatch.chdir(workdir)
        exec(compile(code, "README.md", "exec"), {})  # the README's own text
    finally:
        server.stop()
    new = workdir / "new.qcow2"
    report = qemu.img_check(new)
    assert report.get("check-errors", 0) == 0 and report.get("leaks", 0) == 0
    assert qemu.img_info(new)["backing-filename"] == "../qemu-1700000000/drive-scsi0.qcow2"
    # only what the bitmap marked was copied (3 dirty ranges, cluster-aligned)
    assert os.path.getsize(new) < 4 * MiB
    assert_same(guest, new, "qcow2", "qcow2")
    assert_same(guest, workdir / "restored.raw", "qcow2", "raw")
