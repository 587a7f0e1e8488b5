#include "memory/buffer_pool.h"

namespace sllm {

BufferPool::BufferPool(size_t count, size_t buffer_size, const HostAllocator& allocator)
    : buffer_size_(buffer_size) {
  buffers_.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    buffers_.push_back(allocator(buffer_size));
    free_.push_back(static_cast<int>(i));
  }
}

int BufferPool::acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return cancelled_ || !free_.empty(); });
  if (cancelled_) return -1;
  int index = free_.back();
  free_.pop_back();
  return index;
}

void BufferPool::release(int index) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(index);
  }
  cv_.notify_one();
}

void BufferPool::cancel() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
  }
  cv_.notify_all();
}

bool BufferPool::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = false;
  return free_.size() == buffers_.size();
}

}  // namespace sllm
