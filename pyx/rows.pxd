# The kind column shared by the rows the qcow2 reader makes (_qcow2.pyx: map
# rows, restore plans) and the rows the copy loop takes (_copy.pyx: copy
# requests): (guest offset, length, kind, layer, host offset).  The two
# modules agree on these values because both cimport them from here.
# Declarations only.
#
# Kinds (the low bits, ROW_KIND_MASK):
# ROW_COPY: read the job's source at the host offset (copy requests only).
# ROW_DATA: the bytes are in layer `layer` at the host offset.
# ROW_ZERO: the range reads as zero.
# ROW_UNALLOCATED: no layer of the map's depth holds the range (map rows
#   only; the copy loop refuses it).
# ROW_COMPRESSED: the range lies in one compressed cluster of layer `layer`;
#   the host column holds the cluster's L2 descriptor (host byte offset and
#   sector count, qcow2.txt), decoded with the layer's cluster bits.  Such
#   rows never merge and never cross a cluster boundary.
#
# Flags of ROW_DATA rows:
# ROW_HASH: a data row of a checked layer, starting at one of the layer's
#   cluster boundaries and ending at one (or at the virtual size): every
#   cluster's bytes are hashed, as read, into that layer's per-chunk sums.
# ROW_NOWRITE: read and hash, write nothing (a cluster that layers above
#   hide, wholly or in part, whose digest is still part of its layer's sums).

cdef enum:
    ROW_COPY = 0
    ROW_DATA = 1
    ROW_ZERO = 2
    ROW_UNALLOCATED = 3
    ROW_COMPRESSED = 4
    ROW_KIND_MASK = 0x0F
    ROW_HASH = 0x10
    ROW_NOWRITE = 0x20
