# Flags in the kind column of copy requests (rows of guest offset, length,
# kind, layer, host offset), shared by the plan builder (_qcow2.pyx) and the
# copy loop (_copy.pyx).  Declarations only.
#
# ROW_HASH: a data row of a checked layer, starting at one of the layer's
#   cluster boundaries and ending at one (or at the virtual size): every
#   cluster's bytes are hashed, as read, into that layer's per-chunk sums.
# ROW_NOWRITE: read and hash, write nothing (a cluster that layers above
#   hide, wholly or in part, whose digest is still part of its layer's sums).

cdef enum:
    ROW_KIND_MASK = 0x0F
    ROW_HASH = 0x10
    ROW_NOWRITE = 0x20
