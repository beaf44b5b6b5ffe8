"""The `compress` option of backups: how data clusters are stored.

`none` stores them as they are; `zstd` and `zstd:LEVEL` store each data
cluster that shrinks as a zstd-compressed qcow2 cluster (QEMU's
compression_type zstd), compressed in the copy loop's threads.  One parser
for the storage property, the CLI flag, the manifest and the writer, so that
they accept and spell the same values.
"""

from __future__ import annotations

# Measured on an ext4 image of /usr/share (1.2 GiB, 0.7 GB of data, 64 KiB
# clusters, 2 workers): level 1 wrote 266 MB in 4.1-5.9 s, level 3 259 MB in
# 6.9-7.5 s, qemu-img convert -c zstd 259 MB in 6.9 s.  Level 1 it is.
# Again on a 1.6 GiB image of /usr/share (714 MB of data): a backup at level
# 1 takes 2.0-2.2 CPU s (1.3-1.5 s wall), 266 MB; level 3 2.4-2.5 CPU s, 259
# MB; qemu-img convert -c -W -m 16 3.2-3.5 CPU s (2.3-2.9 s wall), 259 MB.
# Two thirds of our CPU time is zstd, a quarter the kernel's copies.  Per
# cluster, zstd alone: level 1 1.7 s, level 3 2.2 s, level -1 1.5 s but 290
# MB (1.12x qemu-img's); hashLog 12 saves 8% for 1% more bytes; trying the
# first 8 KiB first, or a byte-entropy test, to skip incompressible clusters
# gains nothing (5% of the clusters are), nor does setting the level once per
# context (ZSTD_compress2).  So: level 1, zstd's own parameters.
DEFAULT_ZSTD_LEVEL = 1
MIN_LEVEL = 1
MAX_LEVEL = 19
CHOICES = "none, zstd or zstd:LEVEL (LEVEL 1 to 19)"
# what backups use when neither the storage nor the command line says
DEFAULT_COMPRESS = "zstd"


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
