// Host memory buffers for the chunk pool.
//
// HostBuffer is a move-only RAII handle over page-aligned host memory with a type-erased
// release function, so the same pool can hold plain aligned memory (CPU path) or page-locked
// memory from a device backend (CUDA path) without knowing which.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

namespace sllm {

class HostBuffer {
 public:
  using Release = std::function<void(void*)>;

  HostBuffer() = default;
  HostBuffer(void* data, size_t size, Release release)
      : data_(data), size_(size), release_(std::move(release)) {}
  ~HostBuffer() { reset(); }
  HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = o.data_;
      size_ = o.size_;
      release_ = std::move(o.release_);
      o.data_ = nullptr;
      o.size_ = 0;
    }
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void reset() {
    if (data_ != nullptr && release_) release_(data_);
    data_ = nullptr;
  }
  void* data_ = nullptr;
  size_t size_ = 0;
  Release release_;
};

// Page-aligned (4 KiB) pageable memory; throws sllm::Error(kOutOfMemory) on failure.
HostBuffer allocate_aligned_host(size_t size);

// A function that makes one buffer of the given size (plain aligned, or pinned by a device).
using HostAllocator = std::function<HostBuffer(size_t)>;

}  // namespace sllm
