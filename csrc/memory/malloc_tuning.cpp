#include "memory/malloc_tuning.h"

#include <algorithm>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace sllm {

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
