#include "io/cache_file.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace sllm {

int preallocate(int fd, uint64_t size) {
  if (size == 0) return 0;
  int rc;
  do {
    rc = ::fallocate(fd, 0, 0, static_cast<off_t>(size));
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : errno;
}

namespace {

constexpr uint64_t kBlock = 4096;
constexpr size_t kBounce = 16u << 20;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// pwrite() all of [p, p + n) at off (retrying short writes and EINTR): 0 or the errno.
int write_all(int fd, const char* p, size_t n, uint64_t off) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO;
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return 0;
}

}  // namespace

int write_direct(int direct_fd, int fd, const void* src, size_t n, uint64_t offset) {
  if (offset % kBlock != 0) return EINVAL;
  const char* s = static_cast<const char*>(src);
  const size_t whole = n / kBlock * kBlock;
  size_t pos = 0;
  if (reinterpret_cast<uintptr_t>(s) % kBlock == 0) {
    if (int err = write_all(direct_fd, s, whole, offset)) return err;  // the source is aligned
    pos = whole;
  } else if (whole > 0) {
    // One buffer per thread for the life of the thread (the write-behind pool's few threads).
    thread_local std::unique_ptr<void, FreeDeleter> bounce;
    if (!bounce) {
      void* p = nullptr;
      if (::posix_memalign(&p, kBlock, kBounce) != 0) return ENOMEM;
      bounce.reset(p);
    }
    char* b = static_cast<char*>(bounce.get());
    while (pos < whole) {
      const size_t take = std::min(kBounce, whole - pos);
      std::memcpy(b, s + pos, take);
      if (int err = write_all(direct_fd, b, take, offset + pos)) return err;
      pos += take;
    }
  }
  return write_all(fd, s + pos, n - pos, offset + pos);  // the last partial block, buffered
}

}  // namespace sllm
