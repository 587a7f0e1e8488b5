#include "io/page_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

namespace sllm {

double page_cache_fraction(const std::vector<std::string>& paths) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  uint64_t total = 0, resident = 0;
  std::vector<unsigned char> vec;
  for (const auto& path : paths) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return -1;
    }
    size_t size = static_cast<size_t>(st.st_size);
    if (size == 0) {
      ::close(fd);
      continue;
    }
    void* addr = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (addr == MAP_FAILED) return -1;
    size_t pages = (size + page - 1) / page;
    vec.assign(pages, 0);
    int rc = ::mincore(addr, size, vec.data());
    ::munmap(addr, size);
    if (rc != 0) return -1;
    for (unsigned char v : vec) resident += v & 1u;
    total += pages;
  }
  return total ? static_cast<double>(resident) / static_cast<double>(total) : 0.0;
}

}  // namespace sllm
