// Writing downloaded chunks into a cache file (the remote tier's write-through).
//
// preallocate() reserves the file's blocks before the download, so that a full disk shows before
// anything is fetched. write_direct() bypasses the page cache: the chunk is written with O_DIRECT
// (copied through an aligned buffer of the calling thread when its source is not 4096-aligned), so
// the download does not pay for page-cache allocation and faults, which would take CPU from the
// GETs that share the cores. A chunk whose source is 4096-aligned is written without the copy:
// malloc_offset() (memory/malloc_offset.h) lets the caller arrange for that.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sllm {

// fallocate(fd, 0, 0, size): 0 on success, else the errno (EOPNOTSUPP: the file system cannot
// reserve blocks; the caller then writes with pwrite).
int preallocate(int fd, uint64_t size);

// Writes [src, src + n) at `offset` (a multiple of 4096) of a file: the whole 4 KiB blocks with
// O_DIRECT through `direct_fd` (opened with O_DIRECT), copied through a 4096-aligned buffer of
// the calling thread (16 MiB, reused; none when src is aligned already), the last partial block
// with a buffered pwrite through `fd`. Returns 0, or the errno of the failed write (EINVAL: the
// file system refuses this direct write; the caller then writes buffered). Thread-safe.
int write_direct(int direct_fd, int fd, const void* src, size_t n, uint64_t offset);

}  // namespace sllm
