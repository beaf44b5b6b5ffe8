# C declarations of the Linux and compiler facilities the kernels use that
# Cython's bundled libc/posix declarations lack. Declarations only.
from libc.stdint cimport int64_t, uint64_t
from posix.types cimport off_t


cdef extern from "<fcntl.h>" nogil:
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE
        O_DIRECT
    int fallocate(int fd, int mode, off_t offset, off_t length)


cdef extern from "<unistd.h>" nogil:
    enum:
        SEEK_DATA
        SEEK_HOLE
    ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out,
                            size_t length, unsigned int flags)


cdef extern from "<linux/fs.h>" nogil:
    enum:
        BLKDISCARD
        BLKZEROOUT
        BLKGETSIZE64


cdef extern from "<limits.h>" nogil:
    enum:
        IOV_MAX


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


# GCC/Clang atomic builtins, declared with the concrete types we use.
cdef extern from * nogil:
    enum:
        __ATOMIC_RELAXED
        __ATOMIC_ACQUIRE
        __ATOMIC_RELEASE
        __ATOMIC_SEQ_CST
    uint64_t atomic_add_u64 "__atomic_fetch_add"(uint64_t *ptr, uint64_t val, int order)
    uint64_t atomic_load_u64 "__atomic_load_n"(uint64_t *ptr, int order)
    void atomic_store_u64 "__atomic_store_n"(uint64_t *ptr, uint64_t val, int order)
    int atomic_load_int "__atomic_load_n"(int *ptr, int order)
    void atomic_store_int "__atomic_store_n"(int *ptr, int val, int order)
    bint atomic_cas_ptr "__atomic_compare_exchange_n"(
        void **ptr, void **expected, void *desired, bint weak, int success, int failure)
    void *atomic_load_ptr "__atomic_load_n"(void **ptr, int order)


cdef extern from "<endian.h>" nogil:
    uint64_t htobe64(uint64_t x)
    uint64_t be64toh(uint64_t x)
