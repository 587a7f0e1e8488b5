#include "memory/buffer_pool.h"

namespace sllm {

BufferPool::BufferPool(size_t count, size_t buffer_size, const HostAllocator& allocator)
    : buffers_(count), buffer_size_(buffer_size), allocator_(allocator) {}

int BufferPool::acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (cancelled_) return -1;
    if (!free_.empty()) {
      int index = free_.back();
      free_.pop_back();
      return index;
    }
    if (made_ < buffers_.size()) break;
    cv_.wait(lock);
  }
  // Make a new buffer outside the lock: page-locking is slow and may run in parallel.
  size_t index = made_++;
  lock.unlock();
  HostBuffer buffer;
  try {
    buffer = allocator_(buffer_size_);
  } catch (...) {
    lock.lock();
    made_--;  // the slot stays empty; another acquire may retry
    throw;
  }
  lock.lock();
  buffers_[index] = std::move(buffer);
  ready_++;
  return static_cast<int>(index);
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
  return free_.size() == made_ && ready_ == made_;
}

size_t BufferPool::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_ * buffer_size_;
}

}  // namespace sllm
