# Type stubs of the Cython module pyx/_maptext.pyx.
import numpy as np
import numpy.typing as npt

_Rows = npt.NDArray[np.uint64]

def parse_map_text(
    data: bytes | str,
    start: int = ...,
    size: int | None = ...,
    contiguous: bool = ...,
    mask: int = ...,
    value: int = ...,
) -> _Rows: ...
def parse_map_json(
    data: bytes | str, start: int = ..., size: int | None = ..., contiguous: bool = ...
) -> _Rows: ...
