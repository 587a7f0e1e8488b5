#include "io/cache_file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

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

int populate_write(void* addr, size_t n) {
  if (n == 0) return 0;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(addr) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(addr) + n;
  int rc;
  do {
    rc = ::madvise(reinterpret_cast<void*>(start), end - start, MADV_POPULATE_WRITE);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : errno;  // EINVAL: a kernel before 5.14
}

}  // namespace sllm
