#include "memory/malloc_tuning.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace sllm {

namespace {
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
}  // namespace

size_t malloc_offset(size_t n) {
  std::unique_ptr<void, FreeDeleter> p(std::malloc(n > 0 ? n : 1));
  if (!p) return 0;
  volatile uintptr_t addr = reinterpret_cast<uintptr_t>(p.get());  // an observed allocation
  return static_cast<size_t>(addr % 4096);
}

bool keep_large_blocks(size_t block) {
#if defined(__GLIBC__)
  const size_t threshold = std::max<size_t>(block, size_t{32} << 20) + (size_t{64} << 10);
  if (threshold > (size_t{1} << 29)) return false;  // mallopt takes an int (and the trim twice that)
  if (mallopt(M_MMAP_THRESHOLD, static_cast<int>(threshold)) != 1) return false;
  mallopt(M_TRIM_THRESHOLD, static_cast<int>(2 * threshold));
  return true;
#else
  (void)block;
  return false;
#endif
}

bool release_free_heap() {
#if defined(__GLIBC__)
  return malloc_trim(0) == 1;
#else
  return false;
#endif
}

}  // namespace sllm
