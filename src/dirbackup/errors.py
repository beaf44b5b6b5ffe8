"""The exceptions dirbackup raises on purpose.

Operational failures are `DirbackupError`s (the command line prints them as a
one-line `error: ...`).  I/O failures keep Python's own `OSError` subclasses
(ENOENT -> FileNotFoundError, ENOSPC -> OSError with errno ENOSPC, ...) with
the path or URI and the offset in their message.
"""

from __future__ import annotations


class DirbackupError(Exception):
    """Base class of the errors a user can act on."""


class MapFormatError(DirbackupError, ValueError):
    """`nbdinfo --map` output that is malformed, truncated, overlapping or out of order."""


class ProtocolError(DirbackupError):
    """An NBD server answered something the protocol does not allow."""


class Cancelled(DirbackupError):
    """A copy was cancelled (Ctrl-C or a cancel event) and stopped cleanly."""


class IOTimeout(DirbackupError):
    """A source (or target) made no progress for the I/O timeout: the operation
    was stopped instead of hanging while it holds a guest's lock."""


class ImageError(DirbackupError):
    """A qcow2 image or backing chain that is invalid, unsafe or unsupported."""


class IntegrityError(ImageError):
    """Backed-up data that does not match the digests recorded when it was
    written (or a chain that does not match its manifests): the backup is
    damaged, and nothing it gave is to be used."""


class UnsupportedImage(ImageError):
    """A valid qcow2 feature that dirbackup does not read (encryption, extended L2)."""


class VolumeNameError(DirbackupError, ValueError):
    """A volume name that is not one of ours (or tries to escape the store)."""


class StoreError(DirbackupError):
    """The backup store is missing, unreachable, locked or inconsistent."""


class PruneOptionError(DirbackupError, ValueError):
    """A `prune-backups` retention option string or hash that PVE's schema would reject."""


class ContainerError(DirbackupError):
    """A container archive could not be written, read, verified, extracted or mounted.

    The message is one line meant for the user (the tool's own message included);
    partial output has already been removed when it is raised."""


class HostError(DirbackupError):
    """The standalone host (`dirbackup.host`) could not prepare or finish an
    operation: a disk it cannot read, a restore target it refuses, ..."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the command line where Ctrl-C raises KeyboardInterrupt,
    so that it stops workers, helper processes and mounts, and removes
    temporary files, exactly as Ctrl-C does."""
