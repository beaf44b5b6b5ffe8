# cython: language_level=3
"""Parsers of `nbdinfo --map` output, text and JSON, into extent arrays.

Integrators that already have a map as text (from nbdinfo, or saved) read it
here; the product itself asks the NBD server for block status (_extents.pyx).
Big texts are scanned by two threads, numbers a word at a time.  Every line
is checked: a malformed, overlapping or truncated map raises MapFormatError.
"""
from libc.stdint cimport UINT64_MAX, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy, memset
from posix.mman cimport MADV_HUGEPAGE, madvise

from sysdeps cimport pthread_create, pthread_join, pthread_t

import numpy as np

from dirbackup.errors import MapFormatError

# map texts from this size on are scanned by two threads
cdef Py_ssize_t PARALLEL_TEXT = 4 << 20


include "extbuf.pxi"


cdef void advise_huge(void *p, size_t nbytes) noexcept nogil:
    """Ask for transparent huge pages inside a large allocation: filling a
    big result then takes a few page faults instead of thousands."""
    cdef size_t huge = 2 << 20
    cdef size_t start = ((<size_t>p) + huge - 1) & ~(huge - 1)
    cdef size_t end = ((<size_t>p) + nbytes) & ~(huge - 1)
    if p != NULL and end > start:
        madvise(<void *>start, end - start, MADV_HUGEPAGE)


# ----------------------------------------------------------------------------
# nbdinfo --map (text)

cdef inline bint is_space(unsigned char c) noexcept nogil:
    return c == c' ' or c == c'\t' or c == c'\r'


cdef extern from *:
    """
    /* Word-at-a-time (SWAR) helpers for the map scanner, little-endian hosts.
     * Each looks at 8 bytes with one load instead of branching per byte. */
    #include <Python.h>
    #include <stdint.h>
    #include <string.h>
    #define DB_ONES  0x0101010101010101ULL
    #define DB_HIGHS 0x8080808080808080ULL
    static const uint64_t db_pow10[9] = {1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL,
                                         1000000ULL, 10000000ULL, 100000000ULL};

    static inline uint64_t db_load8(const unsigned char *p) {
        uint64_t w; memcpy(&w, p, 8); return w;
    }
    /* Index (0..8) of the first byte of w that is not an ASCII digit. */
    static inline int db_digit_run(uint64_t w) {
        uint64_t hi = (w & 0xF0F0F0F0F0F0F0F0ULL) ^ 0x3030303030303030ULL;
        uint64_t over = ((w + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL)
                        ^ 0x3030303030303030ULL;
        uint64_t bad = hi | over;   /* a byte that is not a digit has a high-nibble bit */
        return bad ? __builtin_ctzll(bad) >> 3 : 8;
    }
    /* The value of the first n (1..8) digits of w. */
    static inline uint64_t db_digits_value(uint64_t w, int n) {
        uint64_t d = (w - 0x3030303030303030ULL) << (8 * (8 - n)); /* zeros lead */
        d = (d * 10 + (d >> 8)) & 0x00FF00FF00FF00FFULL;              /* 2-digit lanes */
        d = (d * 100 + (d >> 16)) & 0x0000FFFF0000FFFFULL;            /* 4-digit lanes */
        return (d * 10000 + (d >> 32)) & 0xFFFFFFFFULL;               /* 8 digits */
    }
    /* Index (0..8) of the first byte of w that is not a space. */
    static inline int db_space_run(uint64_t w) {
        uint64_t x = w ^ 0x2020202020202020ULL;
        return x ? __builtin_ctzll(x) >> 3 : 8;
    }
    /* Parse decimal digits at s[i:end]: the index after them, -1 if there are
     * none, -2 if the number does not fit in 64 bits.  Eight digits per step
     * while a whole word can be loaded. */
    static inline __attribute__((always_inline)) Py_ssize_t
    db_parse_uint(const unsigned char *s, Py_ssize_t i, Py_ssize_t end, uint64_t *out) {
        uint64_t v = 0;
        Py_ssize_t start = i;
        if (i + 16 <= end) {
            /* up to 15 digits from two words, without a loop */
            uint64_t w0 = db_load8(s + i);
            int k0 = db_digit_run(w0);
            if (k0 == 0)
                return -1;
            if (k0 < 8) {
                *out = db_digits_value(w0, k0);
                return i + k0;
            }
            uint64_t w1 = db_load8(s + i + 8);
            int k1 = db_digit_run(w1);
            if (k1 < 8) {
                v = db_digits_value(w0, 8);
                if (k1)
                    v = v * db_pow10[k1] + db_digits_value(w1, k1);
                *out = v;
                return i + 8 + k1;
            }
        }
        /* near the end of the text, or 16 digits and more: byte by byte; 19
         * digits always fit, longer numbers are checked */
        while (i < end && i - start < 19 && (unsigned char)(s[i] - '0') < 10)
            v = v * 10 + (s[i++] - '0');
        while (i < end && (unsigned char)(s[i] - '0') < 10) {
            uint64_t d = s[i] - '0';
            if (v > (UINT64_MAX - d) / 10)
                return -2;
            v = v * 10 + d;
            i++;
        }
        if (i == start)
            return -1;
        *out = v;
        return i;
    }
    /* Index (0..8) of the first newline in w. */
    static inline int db_newline_at(uint64_t w) {
        uint64_t x = w ^ 0x0A0A0A0A0A0A0A0AULL;
        uint64_t z = (x - DB_ONES) & ~x & DB_HIGHS;
        return z ? __builtin_ctzll(z) >> 3 : 8;
    }
    """
    const uint64_t *POW10 "db_pow10"
    uint64_t load8 "db_load8"(const unsigned char *p) noexcept nogil
    int digit_run "db_digit_run"(uint64_t w) noexcept nogil
    uint64_t digits_value "db_digits_value"(uint64_t w, int n) noexcept nogil
    int space_run "db_space_run"(uint64_t w) noexcept nogil
    int newline_at "db_newline_at"(uint64_t w) noexcept nogil
    Py_ssize_t parse_uint "db_parse_uint"(const unsigned char *s, Py_ssize_t i,
                                          Py_ssize_t end, uint64_t *out) noexcept nogil


cdef object line_text(const unsigned char *s, Py_ssize_t a, Py_ssize_t b):
    text = (<bytes>s[a:b]).decode("utf-8", "replace")
    return text if len(text) <= 200 else text[:200] + "..."


cdef enum:
    TEXT_OK = 0
    TEXT_MALFORMED = 1
    TEXT_RANGE = 2
    TEXT_EXTENT = 3
    TEXT_NOMEM = 4


cdef struct TextState:
    Py_ssize_t lineno
    Py_ssize_t line_start
    Py_ssize_t line_end
    uint64_t off
    uint64_t length
    uint64_t expect
    # a part of a text split between threads: its first extent starts anywhere,
    # and is remembered so the caller can check where the parts meet
    int free_start
    int seen
    uint64_t first_off
    Py_ssize_t first_lineno
    Py_ssize_t first_start
    Py_ssize_t first_end


cdef struct TextPart:
    const unsigned char *s
    Py_ssize_t n
    int contiguous
    uint64_t mask
    uint64_t value
    uint64_t keep
    int rc
    ExtBuf b
    TextState st


cdef inline Py_ssize_t skip_blank(const unsigned char *s, Py_ssize_t j,
                                  Py_ssize_t end) noexcept nogil:
    cdef int k
    # nbdinfo pads numbers to a fixed width with spaces: skip them a word at a
    # time; only a tab or CR (rare) sends us on byte by byte
    while j + 8 <= end:
        k = space_run(load8(s + j))
        j += k
        if k < 8:
            if s[j] != c'\t' and s[j] != c'\r':
                return j
            break
    while j < end and is_space(s[j]):
        j += 1
    return j


cdef inline Py_ssize_t line_end(const unsigned char *s, Py_ssize_t j,
                                Py_ssize_t end) noexcept nogil:
    """Index of the newline ending the line at j (or `end`)."""
    cdef int k
    while j + 8 <= end:
        k = newline_at(load8(s + j))
        j += k
        if k < 8:
            return j
    while j < end and s[j] != c'\n':
        j += 1
    return j


cdef int scan_text(const unsigned char *s, Py_ssize_t n, ExtBuf *b, bint contiguous,
                   uint64_t mask, uint64_t value, uint64_t keep,
                   TextState *st) noexcept nogil:
    """One pass over map text; on a bad line return its error code, with the
    line's number and bounds in `st`."""
    cdef Py_ssize_t i = 0, j
    cdef uint64_t typ = 0
    cdef int rc
    cdef bint blank
    while i < n:
        st.lineno += 1
        st.line_start = i
        j = skip_blank(s, i, n)
        rc = TEXT_OK
        blank = j >= n or s[j] == c'\n'
        if not blank:
            # offset, length and type, each followed by blank space or the end of line
            j = parse_uint(s, j, n, &st.off)
            if j < 0 or j >= n or not is_space(s[j]):
                rc = TEXT_RANGE if j == -2 else TEXT_MALFORMED
            if rc == TEXT_OK:
                j = parse_uint(s, skip_blank(s, j, n), n, &st.length)
                if j < 0 or (j < n and s[j] != c'\n' and not is_space(s[j])):
                    rc = TEXT_RANGE if j == -2 else TEXT_MALFORMED
            if rc == TEXT_OK:
                j = parse_uint(s, skip_blank(s, j, n), n, &typ)
                if j < 0 or (j < n and s[j] != c'\n' and not is_space(s[j])):
                    rc = TEXT_RANGE if j == -2 else TEXT_MALFORMED
                elif typ > <uint64_t>0xFFFFFFFFU:
                    rc = TEXT_RANGE
            if rc == TEXT_OK and st.free_start and not st.seen:
                st.expect = st.off
            if rc == TEXT_OK and not extent_ok(st.off, st.length, st.expect, contiguous):
                rc = TEXT_EXTENT
        if j < 0:
            j = st.line_start
        # the description, up to the end of the line
        j = line_end(s, j, n)
        st.line_end = j
        if rc != TEXT_OK:
            return rc
        i = j + 1
        if not blank:
            if not st.seen:
                st.seen = 1
                st.first_off = st.off
                st.first_lineno = st.lineno
                st.first_start = st.line_start
                st.first_end = st.line_end
            st.expect = st.off + st.length
            if typ & mask == value and buf_push(b, st.off, st.length, typ & keep) < 0:
                return TEXT_NOMEM
    return TEXT_OK


def parse_map_text(data, uint64_t start=0, object size=None, bint contiguous=True,
                   uint64_t mask=UINT64_MAX, uint64_t value=UINT64_MAX):
    """Parse the text printed by `nbdinfo --map[=CONTEXT]` into extents.

    Each line is `offset length type [description]`, separated by any amount of
    blank space.  Blank lines are ignored; any other line that does not have that
    shape raises MapFormatError naming its line number and content, so no entry
    is ever dropped.  With `contiguous` (the default) the extents must start at
    `start`, follow each other without gap or overlap and, when `size` is given,
    end exactly at `size` -- a truncated or reordered map is an error.

    With `mask` and `value`, every line is still checked but only the rows
    whose (flags & mask) == value are returned, with flags & mask (like
    `select`, without a second pass).
    """
    cdef const unsigned char[::1] view
    if isinstance(data, str):
        data = data.encode()
    view = data
    cdef const unsigned char *s = &view[0] if view.shape[0] else <const unsigned char *>b""
    cdef Py_ssize_t n = view.shape[0]
    cdef TextPart a, z
    cdef uint64_t keep = mask
    if mask == UINT64_MAX and value == UINT64_MAX:
        mask = value = 0        # every row, flags as they are
        keep = UINT64_MAX
    cdef pthread_t tid
    cdef Py_ssize_t mid = n
    cdef int started = 0
    cdef const unsigned char *nl
    cdef uint64_t *row
    cdef size_t k
    memset(&a, 0, sizeof(a))
    memset(&z, 0, sizeof(z))
    a.st.expect = start
    a.contiguous = z.contiguous = contiguous
    a.mask = z.mask = mask
    a.value = z.value = value
    a.keep = z.keep = keep
    z.st.free_start = 1
    try:
        with nogil:
            if n >= PARALLEL_TEXT:     # big maps: two halves on two threads
                nl = <const unsigned char *>memchr(s + n // 2, c'\n', n - n // 2)
                if nl != NULL:
                    mid = nl - s + 1
            a.s, a.n = s, mid
            z.s, z.n = s + mid, n - mid
            if text_part_alloc(&a) < 0 or text_part_alloc(&z) < 0:
                a.rc = TEXT_NOMEM
            else:
                if z.n and pthread_create(&tid, NULL, scan_part, &z) == 0:
                    started = 1
                elif z.n:
                    scan_part(&z)
                scan_part(&a)
                if started:
                    pthread_join(tid, NULL)
        if a.rc == TEXT_NOMEM or z.rc == TEXT_NOMEM:
            raise MemoryError()
        if a.rc != TEXT_OK:
            text_error(s, &a.st, a.rc, contiguous, 0)
        if z.rc != TEXT_OK:
            text_error(z.s, &z.st, z.rc, contiguous, a.st.lineno)
        if z.st.seen:
            if a.st.seen or contiguous:
                if contiguous and z.st.first_off != a.st.expect:
                    z.st.off = z.st.first_off
                    z.st.lineno = z.st.first_lineno
                    z.st.line_start, z.st.line_end = z.st.first_start, z.st.first_end
                    z.st.expect = a.st.expect
                    text_error(z.s, &z.st, TEXT_EXTENT, contiguous, a.st.lineno)
            # append the second half's rows, merging where the halves meet
            if buf_reserve(&a.b, z.b.n) < 0:
                raise MemoryError()
            k = 0
            if a.b.n:
                row = a.b.rows + 3 * (a.b.n - 1)
                if row[2] == z.b.rows[2] and row[0] + row[1] == z.b.rows[0]:
                    row[1] += z.b.rows[1]
                    k = 1
            memcpy(a.b.rows + 3 * a.b.n, z.b.rows + 3 * k, (z.b.n - k) * 3 * sizeof(uint64_t))
            a.b.n += z.b.n - k
            a.st.expect = z.st.expect
        check_end(a.b.n, a.st.expect, start, size, contiguous)
        return buf_to_array(&a.b)
    finally:
        free(a.b.rows)
        free(z.b.rows)


cdef int text_part_alloc(TextPart *p) noexcept nogil:
    p.b.cap = p.n // 6 + 1      # "0 1 0\n" is the shortest line: never regrown
    p.b.rows = <uint64_t *>malloc(p.b.cap * 3 * sizeof(uint64_t))
    if p.b.rows == NULL:
        return -1
    advise_huge(p.b.rows, p.b.cap * 3 * sizeof(uint64_t))
    return 0


cdef void *scan_part(void *arg) noexcept nogil:
    cdef TextPart *p = <TextPart *>arg
    p.rc = scan_text(p.s, p.n, &p.b, p.contiguous, p.mask, p.value, p.keep, &p.st)
    return NULL


cdef int text_error(const unsigned char *s, TextState *st, int rc, bint contiguous,
                    Py_ssize_t line_base) except -1:
    """Raise the MapFormatError for a bad line found by scan_text."""
    text = line_text(s, st.line_start, st.line_end)
    where = f"line {line_base + st.lineno}"
    if rc == TEXT_EXTENT:
        check_extent(st.off, st.length, st.expect, contiguous, where, text)
    what = "number out of range" if rc == TEXT_RANGE else "malformed map entry"
    raise MapFormatError(f"{where}: {what}: {text!r}")


cdef inline bint extent_ok(uint64_t off, uint64_t length, uint64_t expect,
                           bint contiguous) noexcept nogil:
    return length != 0 and off <= UINT64_MAX - length and (not contiguous or off == expect)


cdef int check_extent(uint64_t off, uint64_t length, uint64_t expect, bint contiguous,
                      str where, object text) except -1:
    if length == 0:
        raise MapFormatError(f"{where}: zero-length extent: {text!r}")
    if off > UINT64_MAX - length:
        raise MapFormatError(f"{where}: extent runs past 2^64: {text!r}")
    if contiguous and off != expect:
        how = "overlaps the previous one" if off < expect else "leaves a gap"
        raise MapFormatError(
            f"{where}: extent at offset {off} {how} (expected offset {expect}): {text!r}")
    return 0


cdef int check_end(size_t count, uint64_t end, uint64_t start, object size,
                   bint contiguous) except -1:
    if size is None or not contiguous:
        return 0
    if count == 0 and size != start:
        raise MapFormatError(f"map is empty but the export has {size} bytes")
    if end != size:
        raise MapFormatError(
            f"map ends at offset {end} but the export has {size} bytes (truncated or too long)")
    return 0


# ----------------------------------------------------------------------------
# nbdinfo --map --json

cdef struct JsonCursor:
    const unsigned char *s
    Py_ssize_t i
    Py_ssize_t n


cdef inline void skip_ws(JsonCursor *c) noexcept nogil:
    while c.i < c.n and (c.s[c.i] == c' ' or c.s[c.i] == c'\n' or c.s[c.i] == c'\t'
                         or c.s[c.i] == c'\r'):
        c.i += 1


cdef inline bint expect_char(JsonCursor *c, unsigned char ch) noexcept nogil:
    skip_ws(c)
    if c.i < c.n and c.s[c.i] == ch:
        c.i += 1
        return True
    return False


cdef Py_ssize_t scan_string(JsonCursor *c) noexcept nogil:
    """Skip a JSON string at the cursor; return its start (after the quote) or -1."""
    skip_ws(c)
    if c.i >= c.n or c.s[c.i] != c'"':
        return -1
    c.i += 1
    cdef Py_ssize_t start = c.i
    while c.i < c.n:
        if c.s[c.i] == c'\\':
            c.i += 2
            continue
        if c.s[c.i] == c'"':
            c.i += 1
            return start
        c.i += 1
    return -1


cdef Py_ssize_t json_line(JsonCursor *c) noexcept:
    cdef Py_ssize_t k, line = 1
    for k in range(min(c.i, c.n)):
        if c.s[k] == c'\n':
            line += 1
    return line


cdef object json_error(JsonCursor *c, Py_ssize_t entry, str what):
    cdef Py_ssize_t line = json_line(c)
    lo = max(0, c.i - 40)
    near = (<bytes>c.s[lo:min(c.n, c.i + 40)]).decode("utf-8", "replace")
    return MapFormatError(f"line {line}, entry {entry}: {what} near {near!r}")


def parse_map_json(data, uint64_t start=0, object size=None, bint contiguous=True):
    """Parse the output of `nbdinfo --map --json`: an array of objects with
    integer `offset`, `length` and `type` (other keys are skipped).

    The same validation as parse_map_text applies; errors name the line and
    entry number.
    """
    cdef const unsigned char[::1] view
    if isinstance(data, str):
        data = data.encode()
    view = data
    cdef JsonCursor c
    c.s = &view[0] if view.shape[0] else <const unsigned char *>b""
    c.i = 0
    c.n = view.shape[0]
    cdef ExtBuf b
    buf_init(&b)
    cdef Py_ssize_t entry = 0, key_start, key_len, j
    cdef uint64_t off = 0, length = 0, typ = 0, value = 0
    cdef int have
    cdef uint64_t expect = start
    try:
        if not expect_char(&c, c'['):
            raise json_error(&c, 0, "expected '['")
        skip_ws(&c)
        if c.i < c.n and c.s[c.i] == c']':
            c.i += 1
        else:
            while True:
                entry += 1
                if not expect_char(&c, c'{'):
                    raise json_error(&c, entry, "expected '{'")
                have = 0
                while True:
                    key_start = scan_string(&c)
                    if key_start < 0:
                        raise json_error(&c, entry, "expected a key")
                    key_len = c.i - 1 - key_start
                    if not expect_char(&c, c':'):
                        raise json_error(&c, entry, "expected ':'")
                    skip_ws(&c)
                    if c.i < c.n and c.s[c.i] == c'"':
                        if scan_string(&c) < 0:
                            raise json_error(&c, entry, "unterminated string")
                        value = UINT64_MAX
                    else:
                        j = parse_uint(c.s, c.i, c.n, &value)
                        if j == -2:
                            raise json_error(&c, entry, "number out of range")
                        if j < 0:
                            # true/false/null or a negative/float number: skip the token
                            while (c.i < c.n and c.s[c.i] != c',' and c.s[c.i] != c'}'
                                   and c.s[c.i] != c' ' and c.s[c.i] != c'\n'):
                                c.i += 1
                            value = UINT64_MAX
                        else:
                            c.i = j
                    if key_len == 6 and (<bytes>c.s[key_start:key_start + 6]) == b"offset":
                        off = value
                        have |= 1
                    elif key_len == 6 and (<bytes>c.s[key_start:key_start + 6]) == b"length":
                        length = value
                        have |= 2
                    elif key_len == 4 and (<bytes>c.s[key_start:key_start + 4]) == b"type":
                        typ = value
                        have |= 4
                    skip_ws(&c)
                    if expect_char(&c, c','):
                        continue
                    if expect_char(&c, c'}'):
                        break
                    raise json_error(&c, entry, "expected ',' or '}'")
                if (have != 7 or off == UINT64_MAX or length == UINT64_MAX
                        or typ > <uint64_t>0xFFFFFFFFU):
                    raise json_error(&c, entry, "entry needs integer offset, length and type")
                if not extent_ok(off, length, expect, contiguous):
                    check_extent(off, length, expect, contiguous,
                                 f"line {json_line(&c)}, entry {entry}",
                                 f"offset {off} length {length} type {typ}")
                expect = off + length
                if buf_push(&b, off, length, typ) < 0:
                    raise MemoryError()
                if expect_char(&c, c','):
                    continue
                if expect_char(&c, c']'):
                    break
                raise json_error(&c, entry, "expected ',' or ']'")
        skip_ws(&c)
        if c.i != c.n:
            raise json_error(&c, entry, "trailing data after the array")
        check_end(b.n, expect, start, size, contiguous)
        return buf_to_array(&b)
    finally:
        free(b.rows)
