"""Guests and stores for tests: qcow2 VMs changed with qemu-io, restores
compared with qemu-img compare (shared by the provider and reliability tests)."""

from __future__ import annotations

from pathlib import Path

from conftest import MiB, assert_same

from dirbackup import qemu
from dirbackup.host import Disk, Host
from dirbackup.storage import DirectoryStorage

STOREID = "dirb"


class Guest:
    """A VM with qcow2 disks; snapshot() keeps a raw copy of its current state."""

    def __init__(self, root: Path, devices: dict[str, int]) -> None:
        self.root = root
        self.disks = []
        for dev, size in devices.items():
            img = root / f"{dev}.qcow2"
            qemu.img_create(img, size)
            qemu.io(
                img,
                f"write -P 0x{len(self.disks) + 1:02x} 0 {size // 2}",
                f"write -P 0x7e {size - MiB} 512k",
            )
            self.disks.append(Disk(dev, img))
        self.states: list[dict[str, Path]] = []

    @classmethod
    def existing(cls, root: Path, devices: list[str]) -> Guest:
        """The guest whose disks already are in `root` (a copied scene)."""
        guest = cls.__new__(cls)
        guest.root = root
        guest.disks = [Disk(dev, root / f"{dev}.qcow2") for dev in devices]
        guest.states = []
        return guest

    def change(self, dev: str, *cmds: str) -> None:
        qemu.io(self.root / f"{dev}.qcow2", *cmds)

    def snapshot(self) -> dict[str, Path]:
        n = len(self.states)
        state = {}
        for d in self.disks:
            out = self.root / f"{d.device}.t{n}.raw"
            qemu.run(["qemu-img", "convert", "-U", "-O", "raw", str(d.path), str(out)])
            state[d.device] = out
        self.states.append(state)
        return state


def make_storage(tmp_path: Path, **opts: object) -> DirectoryStorage:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return DirectoryStorage(STOREID, {"path": str(store), **opts})


def restore_and_compare(
    storage: DirectoryStorage, volid: str, state: dict[str, Path], tmp_path: Path
) -> None:
    """Restore every disk with our engine and through qemu-img-path; compare both."""
    host = Host(storage, STOREID)
    targets = {dev: tmp_path / f"restore-{dev}.raw" for dev in state}
    host.restore_vm(volid, targets, force=True)
    for dev, raw in state.items():
        assert_same(raw, targets[dev])
    provider = storage.new_backup_provider()
    volname = volid.split(":", 1)[1]
    assert provider.restore_get_mechanism(volname) == ("qemu-img", "qemu")
    sizes = provider.restore_vm_init(volname)
    for dev, raw in state.items():
        assert sizes[dev]["size"] == raw.stat().st_size
        path = provider.restore_vm_volume_init(volname, dev, {})["qemu-img-path"]
        out = tmp_path / f"via-qemu-img-{dev}.raw"
        out.unlink(missing_ok=True)
        try:
            qemu.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", path, str(out)])
        finally:
            provider.restore_vm_volume_cleanup(volname, dev, {})
        assert not Path(path).exists()
        assert_same(raw, out)
    provider.restore_vm_cleanup(volname)


def store_bitmap(storage: DirectoryStorage, device: str, vmid: int = 100) -> str:
    """The bitmap of the store that the next incremental of `device` must
    continue from (the generation its last backup started)."""
    name = storage.new_backup_provider().expected_bitmap(vmid, device)
    assert name is not None, f"no bitmap generation recorded for {device}"
    return name
