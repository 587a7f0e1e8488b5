// A bounded pool of reusable host chunk buffers shared by the pipeline's worker threads.
//
// Buffers are made once (up front) by a HostAllocator and recycled: acquire() blocks while all
// are in use, which is what bounds the pipeline's memory. A cancelled pool wakes every waiter.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <vector>

#include "memory/host_buffer.h"

namespace sllm {

class BufferPool {
 public:
  BufferPool(size_t count, size_t buffer_size, const HostAllocator& allocator);
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // Index of a free buffer, or -1 if the pool was cancelled while waiting.
  int acquire();
  void release(int index);
  void cancel();
  // Makes a cancelled pool usable again; false if some buffer was never released.
  bool reset();

  void* data(int index) const { return buffers_[index].data(); }
  size_t buffer_size() const { return buffer_size_; }
  size_t count() const { return buffers_.size(); }

 private:
  std::vector<HostBuffer> buffers_;
  std::vector<int> free_;
  size_t buffer_size_;
  bool cancelled_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace sllm
