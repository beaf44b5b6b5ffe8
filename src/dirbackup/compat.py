"""The seed's POC v3 method names, in both directions.

The proposal dirbackup grew from used an earlier shape of the API: hooks
(`job_hook`, `backup_hook` with phases start/end/abort/prepare) instead of
init/cleanup methods, `backup_get_archive_name` and `backup_get_task_size`,
a `(mechanism, bitmap-id)` pair from `backup_get_mechanism`, the
`block-device` mechanism (a device path instead of a file handle),
`restore_get_guest_config` and a `storeid` argument on the restore calls.

* `to_v3(provider)` presents a final-API provider (ours) to a host written
  for v3;
* `from_v3(provider)` presents a v3 provider to a host written for the final
  API, such as `dirbackup.host`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from dirbackup.api import BackupProvider, ContainerInfo
from dirbackup.errors import DirbackupError


def to_v3(provider: BackupProvider) -> V3Provider:
    """Wrap a final-API provider in the v3 names."""
    return V3Provider(provider)


def from_v3(provider: Any) -> BackupProvider:
    """Wrap a provider with the v3 names in the final API."""
    return FinalProvider(provider)


class V3Provider:
    """A final-API provider behind the POC v3 names."""

    def __init__(self, provider: BackupProvider) -> None:
        self.provider = provider
        self.storeid = provider.storeid
        self._task_size: dict[int, int] = {}
        self._fds: dict[int, list[int]] = {}

    def provider_name(self) -> str:
        return self.provider.provider_name()

    def job_hook(self, phase: str, info: Mapping[str, Any]) -> None:
        if phase == "start":
            self.provider.job_init(int(info["start-time"]))
        elif phase in ("end", "abort"):
            self.provider.job_cleanup()
        # unknown phases are ignored, as v3 specified

    def backup_get_archive_name(self, vmid: int, vmtype: str, backup_time: int) -> str:
        return self.provider.backup_init(vmid, vmtype, backup_time)["archive-name"]

    def backup_hook(self, phase: str, vmid: int, vmtype: str, info: Mapping[str, Any]) -> None:
        vmid = int(vmid)
        if phase == "end":
            stats = self.provider.backup_cleanup(vmid, vmtype, True, {})
            self._task_size[vmid] = int((stats or {}).get("stats", {}).get("archive-size", 0))
            self._close(vmid)
        elif phase == "abort":
            self.provider.backup_cleanup(vmid, vmtype, False, {"error": info.get("error")})
            self._close(vmid)
        elif phase == "prepare":
            self.provider.backup_container_prepare(vmid, info)
        # "start": backup_get_archive_name already started the backup

    def backup_get_mechanism(self, vmid: int, vmtype: str) -> tuple[str, str | None]:
        mechanism = self.provider.backup_get_mechanism(vmid, vmtype)
        if mechanism == "file-handle":
            mechanism = "block-device"
        return mechanism, self._bitmap_id(int(vmid)) if vmtype == "qemu" else None

    def _bitmap_id(self, vmid: int) -> str | None:
        """Like the seed: the id of the last good backup while incrementals can
        build on it, a fresh one otherwise."""
        store = getattr(self.provider, "store", None)
        if store is None or str(self.provider.storage_plugin.vm_backup_mode()) != "incremental":
            return None
        prev = store.read_previous(vmid, "qemu")
        return prev.backup.split("-", 1)[1] if prev.backup else "fresh"

    def backup_get_task_size(self, vmid: int) -> int:
        return self._task_size.get(int(vmid), 0)

    def backup_vm(
        self,
        vmid: int,
        guest_config: str,
        volumes: Mapping[str, Mapping[str, Any]],
        info: Mapping[str, Any] | None,
    ) -> None:
        converted: dict[str, dict[str, Any]] = {}
        for device, vol in volumes.items():
            vol = dict(vol)
            if "path" in vol and "file-handle" not in vol:
                fd = _open_source(vol.pop("path"))
                self._fds.setdefault(int(vmid), []).append(fd)
                vol["file-handle"] = fd
            converted[device] = vol
        self.provider.backup_vm(vmid, guest_config, converted, info)

    def _close(self, vmid: int) -> None:
        for fd in self._fds.pop(vmid, []):
            os.close(fd)

    def backup_container(
        self,
        vmid: int,
        guest_config: str,
        exclude_patterns: Sequence[str],
        info: Mapping[str, Any],
    ) -> None:
        self.provider.backup_container(vmid, guest_config, exclude_patterns, info)

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        self.provider.backup_handle_log_file(vmid, filename)

    def restore_get_mechanism(self, volname: str, storeid: str | None = None) -> tuple[str, str]:
        return self.provider.restore_get_mechanism(volname)

    def restore_get_guest_config(self, volname: str, storeid: str | None = None) -> str:
        return self.provider.archive_get_guest_config(volname)

    def restore_get_firewall_config(self, volname: str, storeid: str | None = None) -> str | None:
        return self.provider.archive_get_firewall_config(volname)

    def restore_vm_init(self, volname: str, storeid: str | None = None) -> dict[str, Any]:
        return self.provider.restore_vm_init(volname)

    def restore_vm_cleanup(self, volname: str, storeid: str | None = None) -> None:
        self.provider.restore_vm_cleanup(volname)

    def restore_vm_volume_init(
        self, volname: str, storeid: str | None, device: str, info: Mapping[str, Any] | None
    ) -> dict[str, str]:
        return self.provider.restore_vm_volume_init(volname, device, info)

    def restore_vm_volume_cleanup(
        self, volname: str, storeid: str | None, device: str, info: Mapping[str, Any] | None
    ) -> None:
        self.provider.restore_vm_volume_cleanup(volname, device, info)

    def restore_container_init(
        self, volname: str, storeid: str | None, info: Mapping[str, Any] | None
    ) -> dict[str, str]:
        return self.provider.restore_container_init(volname, info)

    def restore_container_cleanup(
        self, volname: str, storeid: str | None, info: Mapping[str, Any] | None
    ) -> None:
        self.provider.restore_container_cleanup(volname, info)


def _open_source(path: str) -> int:
    """Open a v3 block-device path for reading (O_DIRECT where possible)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise DirbackupError(f"cannot open backup source {path}: {exc.strerror}") from None


class FinalProvider(BackupProvider):
    """A v3 provider behind the final API names (for dirbackup.host)."""

    def __init__(self, v3: Any) -> None:
        super().__init__(
            getattr(v3, "storage_plugin", None),
            getattr(v3, "scfg", None),
            getattr(v3, "storeid", ""),
            None,
        )
        self.v3 = v3
        self._start: dict[int, int] = {}
        self._bitmap_id: dict[int, Any] = {}

    def provider_name(self) -> str:
        return str(self.v3.provider_name())

    def job_init(self, start_time: int) -> None:
        self.v3.job_hook("start", {"start-time": start_time})

    def job_cleanup(self) -> None:
        self.v3.job_hook("end", {})

    def backup_init(self, vmid: int, vmtype: str, start_time: int) -> dict[str, str]:
        name = self.v3.backup_get_archive_name(vmid, vmtype, start_time)
        self.v3.backup_hook("start", vmid, vmtype, {"start-time": start_time})
        self._start[int(vmid)] = start_time
        return {"archive-name": name}

    def backup_cleanup(
        self, vmid: int, vmtype: str | None, success: bool, info: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        self.v3.backup_hook("end" if success else "abort", vmid, vmtype, dict(info or {}))
        if not success:
            return {}
        return {"stats": {"archive-size": int(self.v3.backup_get_task_size(vmid) or 0)}}

    def backup_get_mechanism(self, vmid: int, vmtype: str) -> str:
        mechanism, bitmap_id = self.v3.backup_get_mechanism(vmid, vmtype)
        self._bitmap_id[int(vmid)] = bitmap_id
        return "file-handle" if mechanism == "block-device" else str(mechanism)

    def backup_vm_query_incremental(
        self, vmid: int, volumes: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, str]:
        bitmap_id = self._bitmap_id.get(int(vmid))
        if bitmap_id is None:
            return {}
        fresh = str(bitmap_id) in ("fresh", str(self._start.get(int(vmid))))
        return {device: "new" if fresh else "use" for device in volumes}

    def backup_vm(
        self, vmid: int, guest_config: str, volumes: Mapping[str, Any], info: Any
    ) -> None:
        converted = {}
        for device, vol in volumes.items():
            vol = dict(vol)
            if "file-handle" in vol:
                fh = vol.pop("file-handle")
                fd = fh if isinstance(fh, int) else fh.fileno()
                vol["path"] = f"/proc/self/fd/{fd}"
            converted[device] = vol
        self.v3.backup_vm(vmid, guest_config, converted, info)

    def backup_container_prepare(self, vmid: int, info: ContainerInfo | Mapping[str, Any]) -> None:
        self.v3.backup_hook("prepare", vmid, "lxc", info)

    def backup_container(
        self, vmid: int, guest_config: str, exclude_patterns: Sequence[str], info: Any
    ) -> None:
        self.v3.backup_container(vmid, guest_config, exclude_patterns, info)

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        self.v3.backup_handle_log_file(vmid, filename)

    def restore_get_mechanism(self, volname: str, *storeid: str) -> tuple[str, str]:
        mechanism, vmtype = self.v3.restore_get_mechanism(volname, self.storeid)
        return str(mechanism), str(vmtype)

    def archive_get_guest_config(self, volname: str, *storeid: str) -> str:
        return str(self.v3.restore_get_guest_config(volname, self.storeid))

    def archive_get_firewall_config(self, volname: str, *storeid: str) -> str | None:
        result = self.v3.restore_get_firewall_config(volname, self.storeid)
        return None if result is None else str(result)

    def restore_vm_init(self, volname: str, *storeid: str) -> dict[str, dict[str, int]]:
        return dict(self.v3.restore_vm_init(volname, self.storeid))

    def restore_vm_cleanup(self, volname: str, *storeid: str) -> None:
        self.v3.restore_vm_cleanup(volname, self.storeid)

    def restore_vm_volume_init(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        return dict(self.v3.restore_vm_volume_init(volname, self.storeid, device_name, info))

    def restore_vm_volume_cleanup(
        self, volname: str, device_name: str, info: Mapping[str, Any] | None = None
    ) -> None:
        self.v3.restore_vm_volume_cleanup(volname, self.storeid, device_name, info)

    def restore_container_init(self, volname: str, *args: Any) -> dict[str, str]:
        return dict(self.v3.restore_container_init(volname, self.storeid, args[-1] if args else {}))

    def restore_container_cleanup(self, volname: str, *args: Any) -> None:
        self.v3.restore_container_cleanup(volname, self.storeid, args[-1] if args else {})
