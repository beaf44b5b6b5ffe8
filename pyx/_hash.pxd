# XXH64, written from the public xxHash specification, as inline nogil code.
# Used for the per-chunk digests recorded in a backup's manifest: computed in
# the copy loop while the data is in cache, and again by `verify`.
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #define DIRBACKUP_XXH_P1 0x9E3779B185EBCA87ULL
    #define DIRBACKUP_XXH_P2 0xC2B2AE3D27D4EB4FULL
    #define DIRBACKUP_XXH_P3 0x165667B19E3779F9ULL
    #define DIRBACKUP_XXH_P4 0x85EBCA77C2B2AE63ULL
    #define DIRBACKUP_XXH_P5 0x27D4EB2F165667C5ULL
    """
    const uint64_t XXH_P1 "DIRBACKUP_XXH_P1"
    const uint64_t XXH_P2 "DIRBACKUP_XXH_P2"
    const uint64_t XXH_P3 "DIRBACKUP_XXH_P3"
    const uint64_t XXH_P4 "DIRBACKUP_XXH_P4"
    const uint64_t XXH_P5 "DIRBACKUP_XXH_P5"


cdef inline uint64_t rotl64(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t read64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)        # little-endian hosts only (x86_64, aarch64)
    return v


cdef inline uint64_t read32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t xxh_round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc = acc + lane * XXH_P2
    acc = rotl64(acc, 31)
    return acc * XXH_P1


cdef inline uint64_t xxh_merge(uint64_t acc, uint64_t v) noexcept nogil:
    acc = acc ^ xxh_round(0, v)
    return acc * XXH_P1 + XXH_P4


cdef inline uint64_t xxh64(const void *data, size_t length, uint64_t seed) noexcept nogil:
    cdef const unsigned char *p = <const unsigned char *>data
    cdef const unsigned char *end = p + length
    cdef uint64_t v1, v2, v3, v4, acc
    if length >= 32:
        v1 = seed + XXH_P1 + XXH_P2
        v2 = seed + XXH_P2
        v3 = seed
        v4 = seed - XXH_P1
        while p + 32 <= end:
            v1 = xxh_round(v1, read64(p))
            v2 = xxh_round(v2, read64(p + 8))
            v3 = xxh_round(v3, read64(p + 16))
            v4 = xxh_round(v4, read64(p + 24))
            p += 32
        acc = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18)
        acc = xxh_merge(acc, v1)
        acc = xxh_merge(acc, v2)
        acc = xxh_merge(acc, v3)
        acc = xxh_merge(acc, v4)
    else:
        acc = seed + XXH_P5
    acc += length
    while p + 8 <= end:
        acc = acc ^ xxh_round(0, read64(p))
        acc = rotl64(acc, 27) * XXH_P1 + XXH_P4
        p += 8
    if p + 4 <= end:
        acc = acc ^ (read32(p) * XXH_P1)
        acc = rotl64(acc, 23) * XXH_P2 + XXH_P3
        p += 4
    while p < end:
        acc = acc ^ (p[0] * XXH_P5)
        acc = rotl64(acc, 11) * XXH_P1
        p += 1
    acc = acc ^ (acc >> 33)
    acc = acc * XXH_P2
    acc = acc ^ (acc >> 29)
    acc = acc * XXH_P3
    acc = acc ^ (acc >> 32)
    return acc


# A cluster that reads as zero contributes this instead of hashing its bytes.
cdef inline uint64_t zero_unit_digest(uint64_t offset, uint64_t length) noexcept nogil:
    cdef uint64_t tag[2]
    tag[0] = 0x7A65726F636C7573     # "zeroclus"
    tag[1] = length
    return xxh64(tag, 16, offset)


# Per-unit digest salted by the unit's guest offset, so that units can be
# summed into their chunk's digest in any order (threads) and a unit moved
# to a wrong offset still changes the sum.
cdef inline uint64_t data_unit_digest(const void *data, uint64_t offset,
                                      uint64_t length) noexcept nogil:
    return xxh64(data, length, offset)
