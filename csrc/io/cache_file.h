// Writing downloaded chunks into a memory-mapped cache file (the remote tier's write-through).
//
// Buffered pwrite()s into one file are serialised by the file system (ext4 and XFS hold the
// inode lock for the whole write), so parallel download threads would queue behind each other.
// Stores into a shared mapping of the file take no such lock. Two helpers make them safe:
// preallocate() reserves every block first (so a store can never meet a full disk, which would
// be SIGBUS), and populate_write() faults a range in up front (in bulk, and so that an I/O
// error becomes an error code rather than SIGBUS in the copy that follows).
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

}  // namespace sllm
