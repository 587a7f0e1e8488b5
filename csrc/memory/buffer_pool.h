// A bounded pool of reusable host chunk buffers shared by the pipeline's worker threads.
//
// Buffers are made on demand by a HostAllocator, at most `count` of them, and recycled:
// acquire() blocks while all are in use, which is what bounds the pipeline's memory. Making
// them on demand spreads the cost of page-locking over the workers, overlapped with their reads,
// and small loads never make the whole pool. A cancelled pool wakes every waiter.
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
  // Makes a cancelled pool usable again; false if some buffer was never released, is still being
  // made, or an allocation failed (such a pool must not be reused).
  bool reset();

  void* data(int index) const { return buffers_[index].data(); }
  size_t buffer_size() const { return buffer_size_; }
  size_t capacity() const { return buffers_.size(); }
  size_t allocated_bytes() const;
  // Thread-seconds spent making buffers since the pool was created.
  double alloc_seconds() const;

 private:
  std::vector<HostBuffer> buffers_;  // size() == capacity; empty slots not yet made
  std::vector<int> free_;            // made and free
  std::vector<int> unmade_;          // slots nobody is making (never made, or whose making failed)
  size_t making_ = 0;                // slots being made right now
  size_t ready_ = 0;                 // slots whose allocation finished
  double alloc_seconds_ = 0;         // time spent in the allocator, over all threads
  size_t buffer_size_;
  HostAllocator allocator_;
  bool cancelled_ = false;
  bool failed_ = false;  // an allocation failed: the pool is not reused by later loads
  mutable std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace sllm
