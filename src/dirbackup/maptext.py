"""Read `nbdinfo --map` output: the face of the Cython parsers in
`dirbackup._maptext`, for integrators that have a map as text or JSON.

The product asks the NBD server for block status itself (extents.py); these
parsers are public API and reachable as extents.parse_map_text/parse_map_json
too.  They return extent arrays (extents.Extents): shape (N, 3), uint64, rows
of (offset, length, flags).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dirbackup import _maptext


def parse_map_text(
    data: bytes | str,
    start: int = 0,
    size: int | None = None,
    contiguous: bool = True,
    select: tuple[int, int] | None = None,
) -> npt.NDArray[np.uint64]:
    """Parse `nbdinfo --map[=CONTEXT]` text output.

    Every non-blank line must be `offset length type [description]`; a line
    of any other shape raises MapFormatError naming its number and content.
    With `contiguous`, extents must start at `start`, follow each other
    without gap or overlap, and end at `size` when it is given.  With
    `select=(mask, value)` only rows with (flags & mask) == value are
    returned (every line is still checked): `select=(DIRTY, DIRTY)` gives the
    dirty regions of a bitmap map in one pass.
    """
    if select is None:
        return _maptext.parse_map_text(data, start, size, contiguous)
    return _maptext.parse_map_text(data, start, size, contiguous, select[0], select[1])


def parse_map_json(
    data: bytes | str, start: int = 0, size: int | None = None, contiguous: bool = True
) -> npt.NDArray[np.uint64]:
    """Parse `nbdinfo --map --json` output, with the checks of parse_map_text."""
    return _maptext.parse_map_json(data, start, size, contiguous)
