#include "device/cpu_device.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>

namespace sllm {

void CpuDevice::copy_from_host(void* dst, const void* src, size_t n, int worker) {
  std::memcpy(dst, src, n);
}

void CpuDevice::prepare_destination(void* dst, size_t n) {
#ifdef MADV_HUGEPAGE
  // Large destinations are written once in full: huge pages cut the page faults of the first
  // touch by 512x. Advisory only; failure is harmless.
  constexpr uintptr_t kHuge = 2u << 20;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(dst) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(dst) + n) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace sllm
