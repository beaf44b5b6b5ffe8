# The entries of the copy loop's ops tables (TargetOps, SourceOps in
# _copy.pyx): file I/O with retries, and the write, zero, copy_file_range and
# discard operations of each kind of target and source.  The loop never calls
# these by kind; CopyJob._bind_ops puts them in the tables once per job.
# Included by _copy.pyx (after Job, Worker and the small helpers it uses:
# fail, account, cancelled), whose cimports it relies on.

# ----------------------------------------------------------------------------
# File I/O with retries

cdef int read_fd(Job *j, int fd, char *buf, uint64_t length, uint64_t offset,
                 bint direct, bint eof_is_zero, int op) noexcept nogil:
    """Read exactly `length` bytes (EINTR and short reads retried).  With
    O_DIRECT the read is widened to the alignment (the buffer has room).
    Premature EOF is an error, or zeros for qcow2 layers (QEMU reads the
    missing tail of a file as zeros)."""
    cdef uint64_t want = length
    cdef uint64_t done = 0
    cdef ssize_t r
    cdef int err
    if direct:
        want = (length + ALIGN - 1) & ~(<uint64_t>ALIGN - 1)
    while done < want:
        r = pread(fd, buf + done, want - done, offset + done)
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            fail(j, err, op, offset + done, NULL)
            return -1
        if r == 0:
            break
        done += r
    if done < length:
        if eof_is_zero:
            memset(buf + done, 0, length - done)
        else:
            fail(j, EIO, OP_EOF, offset + done,
                 b"premature end of file: the source is shorter than its declared size")
            return -1
    account(&j.read_bytes, length)
    return 0


cdef inline void lock_writes(Job *j) noexcept nogil:
    """Writers of one regular file queue here: the kernel serialises them on
    the inode lock anyway, and its waiters spin -- ours sleep, leaving the CPU
    to readers and to the NBD server."""
    if j.serialize_writes:
        pthread_mutex_lock(&j.write_lock)


cdef inline void unlock_writes(Job *j) noexcept nogil:
    if j.serialize_writes:
        pthread_mutex_unlock(&j.write_lock)


cdef int write_fd(Job *j, int fd, const char *buf, uint64_t length,
                  uint64_t offset) noexcept nogil:
    cdef uint64_t done = 0
    cdef ssize_t r
    cdef int err
    while done < length:
        lock_writes(j)
        r = pwrite(fd, buf + done, length - done, offset + done)
        unlock_writes(j)
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            fail(j, err, OP_WRITE, offset + done, NULL)
            return -1
        if r == 0:
            fail(j, ENOSPC, OP_WRITE, offset + done, NULL)
            return -1
        done += r
    account(&j.written_bytes, length)
    return 0


cdef int writev_fd(Job *j, int fd, iovec *iov, uint64_t count, uint64_t offset,
                   uint64_t guest_offset) noexcept nogil:
    """pwritev the whole vector at `offset`, in IOV_MAX pieces, finishing any
    short write piece by piece."""
    cdef uint64_t i = 0, k, batch, total, n, skip, host
    cdef ssize_t r
    cdef int err
    while i < count:
        batch = count - i
        if batch > IOV_MAX:
            batch = IOV_MAX
        total = 0
        for k in range(i, i + batch):
            total += iov[k].iov_len
        lock_writes(j)
        r = pwritev(fd, iov + i, <int>batch, offset)
        unlock_writes(j)
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            fail(j, err, OP_WRITE, guest_offset, NULL)
            return -1
        if <uint64_t>r < total:
            # finish this batch with plain writes, after the bytes that made it
            skip = r
            host = offset
            for k in range(i, i + batch):
                n = iov[k].iov_len
                if skip >= n:
                    skip -= n
                    host += n
                    continue
                if write_fd(j, fd, <char *>iov[k].iov_base + skip, n - skip, host + skip) < 0:
                    return -1
                host += n
                skip = 0
            account(&j.written_bytes, r)
        else:
            account(&j.written_bytes, total)
        offset += total
        i += batch
    return 0


cdef int zero_fd(Job *j, uint64_t offset, uint64_t length) noexcept nogil:
    """Make [offset, offset+length) of the target read as zero."""
    cdef uint64_t rng[2]
    cdef int rc, err
    cdef uint64_t piece
    if j.tgt_blockdev:
        rng[0] = offset
        rng[1] = length
        rc = ioctl(j.tgt_fd, BLKZEROOUT, rng)
    else:
        rc = fallocate(j.tgt_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc < 0 and errno == EOPNOTSUPP:
            rc = fallocate(j.tgt_fd, FALLOC_FL_ZERO_RANGE, offset, length)
    if rc == 0:
        return 0
    err = errno
    if err != EOPNOTSUPP and err != ENOTTY and err != EINVAL and err != ENOSYS:
        fail(j, err, OP_ZERO, offset, NULL)
        return -1
    while length:       # no way to punch: write zeros
        piece = length if length < ZERO_BUF else ZERO_BUF
        if write_fd(j, j.tgt_fd, j.zeros, piece, offset) < 0:
            return -1
        offset += piece
        length -= piece
    return 0


# ----------------------------------------------------------------------------
# Target operations

cdef int zero_nothing(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    """Fresh targets and sinks of self-contained images already read as zero."""
    return 0


cdef int write_nothing(Worker *w, const char *buf, uint64_t offset,
                       uint64_t length) noexcept nogil:
    return 0


cdef int write_file(Worker *w, const char *buf, uint64_t offset, uint64_t length) noexcept nogil:
    return write_fd(w.job, w.job.tgt_fd, buf, length, offset)


cdef int zero_file(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    return zero_fd(w.job, offset, length)


cdef int write_nbd(Worker *w, const char *buf, uint64_t offset, uint64_t length) noexcept nogil:
    if nbd_pwrite(w.tgt_h, buf, length, offset, 0) < 0:
        fail_nbd(w.job, OP_WRITE, offset)
        return -1
    account(&w.job.written_bytes, length)
    return 0


cdef int zero_nbd(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    """NBD_CMD_WRITE_ZEROES, for servers that can."""
    if nbd_zero(w.tgt_h, length, offset, 0) < 0:
        fail_nbd(w.job, OP_ZERO, offset)
        return -1
    return 0


cdef int zero_nbd_by_writing(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    """Write zeros, for servers that cannot zero."""
    cdef Job *j = w.job
    cdef uint64_t piece
    while length:
        piece = length if length < ZERO_BUF else ZERO_BUF
        if nbd_pwrite(w.tgt_h, j.zeros, piece, offset, 0) < 0:
            fail_nbd(j, OP_WRITE, offset)
            return -1
        offset += piece
        length -= piece
    return 0


cdef int zero_sink(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    """Record zero clusters in a sink whose image has a backing file."""
    cdef sink_ops *s = w.job.sink
    if s.zero(s.ctx, offset, length) < 0:
        fail(w.job, errno, OP_ALLOC, offset, NULL)
        return -1
    return 0

# ----------------------------------------------------------------------------
# Source discards

cdef int discard_nbd(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    cdef int err
    if nbd_trim(w.src_h, length, offset, 0) < 0:
        err = nbd_get_errno()
        return err if err else EOPNOTSUPP
    return 0


cdef int discard_blockdev(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    cdef uint64_t rng[2]
    rng[0] = offset
    rng[1] = length
    if ioctl(w.job.src_fd, BLKDISCARD, rng) < 0:
        return errno if errno else EOPNOTSUPP
    return 0


cdef int discard_file(Worker *w, uint64_t offset, uint64_t length) noexcept nogil:
    if fallocate(w.job.src_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0:
        return errno if errno else EOPNOTSUPP
    return 0


# ----------------------------------------------------------------------------
# copy_file_range, the file target's shortcut for unhashed layer rows

cdef int copy_range(Worker *w, int in_fd, uint64_t *src, uint64_t *dst,
                    uint64_t *length) noexcept nogil:
    """copy_file_range from a layer into the target file.  Return 0 when
    done, 1 when the kernel cannot do it here (the caller falls back to
    read/write for what is left), -1 on error."""
    cdef Job *j = w.job
    cdef off_t s = src[0], d = dst[0]
    cdef ssize_t r
    cdef int err
    while length[0]:
        lock_writes(j)
        r = copy_file_range(in_fd, &s, j.tgt_fd, &d, length[0], 0)
        unlock_writes(j)
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if (err == EXDEV or err == EINVAL or err == ENOSYS or err == EOPNOTSUPP
                    or err == EBADF):
                j.cfr_ok = 0
                return 1
            fail(j, err, OP_WRITE, d, NULL)
            return -1
        if r == 0:
            return 1            # end of the layer file: the rest reads as zero
        src[0] += r
        dst[0] += r
        length[0] -= r
        account(&j.read_bytes, r)
        account(&j.written_bytes, r)
    return 0
