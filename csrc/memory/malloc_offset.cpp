#include "memory/malloc_offset.h"

#include <cstdint>
#include <cstdlib>
#include <memory>

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

}  // namespace sllm
