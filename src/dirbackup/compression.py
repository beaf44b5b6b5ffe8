"""The `compress` option of backups: how data clusters are stored.

`none` stores them as they are; `zstd` and `zstd:LEVEL` store each data
cluster that shrinks as a zstd-compressed qcow2 cluster (QEMU's
compression_type zstd), compressed in the copy loop's threads.  One parser
for the storage property, the CLI flag, the manifest and the writer, so that
they accept and spell the same values.
"""

from __future__ import annotations

# zstd's fastest regular level: measured against level 3 on an ext4 image
# of /usr (see tests/test_compress.py and the issue 14 report)
DEFAULT_ZSTD_LEVEL = 1
MIN_LEVEL = 1
MAX_LEVEL = 19
CHOICES = "none, zstd or zstd:LEVEL (LEVEL 1 to 19)"
# what backups use when neither the storage nor the command line says
DEFAULT_COMPRESS = "none"


def compress_level(value: str | None) -> int:
    """The zstd level `value` asks for, 0 for none; ValueError naming the
    accepted forms for anything else."""
    if value is None:
        return 0
    text = str(value).strip().lower()
    if text == "none":
        return 0
    if text == "zstd":
        return DEFAULT_ZSTD_LEVEL
    algo, sep, level = text.partition(":")
    if algo == "zstd" and sep and level.isdigit():
        n = int(level)
        if MIN_LEVEL <= n <= MAX_LEVEL:
            return n
    raise ValueError(f"invalid compression {value!r}: use {CHOICES}")


def normalize(value: str | None) -> str:
    """The canonical spelling: `none` or `zstd:LEVEL`."""
    level = compress_level(value)
    return "none" if level == 0 else f"zstd:{level}"
