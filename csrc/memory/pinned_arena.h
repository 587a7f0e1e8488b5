// A large block of host memory allocated once, up front: the store server's memory pool.
//
// It is made of fixed-size segments allocated in parallel. Pinning costs ~0.4 s per GiB with
// cuMemHostAlloc; almost all of it is faulting the pages in, which parallelises, so segments are
// faulted in by worker threads and then registered with the driver (cuMemHostRegister, about
// 0.05 s per GiB). With a usable CUDA driver the segments are
// page-locked and portable (DMA-able by every GPU at full speed); without one they are plain
// page-aligned memory, touched so that it is resident from the start.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "memory/host_buffer.h"

namespace sllm {

class Device;

class PinnedArena {
 public:
  // `size` is rounded up to whole segments. Throws sllm::Error(kOutOfMemory) when the memory
  // cannot be had; nothing stays allocated then.
  PinnedArena(size_t size, size_t segment_size, bool pin, int threads);

  bool pinned() const { return pinned_; }
  size_t size() const { return size_; }
  size_t segment_size() const { return segment_size_; }
  size_t num_segments() const { return segments_.size(); }
  char* segment(size_t i) const { return static_cast<char*>(segments_.at(i).data()); }
  // Frees every segment now (the destructor does too).
  void release();

 private:
  // Holds the GPU's primary context for as long as pinned segments exist: the driver frees every
  // allocation of a context when its last user releases it. Declared first: destroyed last.
  std::shared_ptr<Device> device_;
  std::vector<HostBuffer> segments_;
  size_t size_ = 0;
  size_t segment_size_ = 0;
  bool pinned_ = false;
};

}  // namespace sllm
