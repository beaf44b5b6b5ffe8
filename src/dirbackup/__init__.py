"""dirbackup: back up QEMU guests and containers into a plain directory.

The package is layered: Cython kernels (`dirbackup._extents`, `dirbackup._copy`,
`dirbackup._qcow2`) do the data path with the GIL released; thin Python
modules (`extents`, `copy`, `qcow2`) give them typed faces; the provider, the
storage plugin and the command line are built on those.
"""

import os as _os

# dirbackup uses numpy arrays but no linear algebra: keep OpenBLAS from
# starting (and spinning) a thread per core next to the copy workers.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
