// Writing downloaded chunks into a memory-mapped cache file (the remote tier's write-through).
//
// Buffered pwrite()s into one file are serialised by the file system (ext4 and XFS hold the
// inode lock for the whole write), so parallel download threads would queue behind each other.
// Stores into a shared mapping of the file take no such lock. Two helpers make them safe:
// preallocate() reserves every block first (so a store can never meet a full disk, which would
// be SIGBUS), and populate_write() faults a range in up front (in bulk, and so that an I/O
// error becomes an error code rather than SIGBUS in the copy that follows).
//
// write_direct() bypasses the page cache altogether: the chunk is copied through an aligned
// buffer of the calling thread and written with O_DIRECT, so the download does not pay for
// page-cache allocation and faults (about 7 thread-seconds per 6.4 GB on the H100 machine,
// taken from the GETs that share the cores). A chunk whose source is 4096-aligned already is
// written without that copy: malloc_offset() (memory/malloc_tuning.h) lets the caller arrange
// for that (see sllm_store/remote/cache.py, aligned GETs).
#pragma once

#include <cstddef>
#include <cstdint>

namespace sllm {

// fallocate(fd, 0, 0, size): 0 on success, else the errno (EOPNOTSUPP: the file system cannot
// reserve blocks; the caller then writes with pwrite).
int preallocate(int fd, uint64_t size);

// madvise(MADV_POPULATE_WRITE) over the pages of [addr, addr + n): 0 on success, else the errno
// (EINVAL: the kernel predates it, Linux < 5.14; the caller then writes with pwrite).
int populate_write(void* addr, size_t n);

// Writes [src, src + n) at `offset` (a multiple of 4096) of a file: the whole 4 KiB blocks with
// O_DIRECT through `direct_fd` (opened with O_DIRECT), copied through a 4096-aligned buffer of
// the calling thread (16 MiB, reused; none when src is aligned already), the last partial block
// with a buffered pwrite through `fd`. Returns 0, or the errno of the failed write (EINVAL: the
// file system refuses this direct write; the caller then writes buffered). Thread-safe.
int write_direct(int direct_fd, int fd, const void* src, size_t n, uint64_t offset);

}  // namespace sllm
