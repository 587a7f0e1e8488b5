#include "memory/host_buffer.h"

#include <cstdlib>
#include <string>

#include "common/errors.h"
#include "io/file_reader.h"

namespace sllm {

HostBuffer allocate_aligned_host(size_t size) {
  void* p = nullptr;
  size_t rounded = (size + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
  if (rounded == 0) rounded = kDirectAlignment;
  if (::posix_memalign(&p, kDirectAlignment, rounded) != 0 || p == nullptr) {
    throw Error(ErrorKind::kOutOfMemory,
                "cannot allocate " + std::to_string(rounded) + " bytes of host memory");
  }
  return HostBuffer(p, rounded, [](void* q) { std::free(q); });
}

}  // namespace sllm
