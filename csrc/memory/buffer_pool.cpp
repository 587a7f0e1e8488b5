#include "memory/buffer_pool.h"

#include <chrono>

namespace sllm {

BufferPool::BufferPool(size_t count, size_t buffer_size, const HostAllocator& allocator)
    : buffers_(count), buffer_size_(buffer_size), allocator_(allocator) {
  unmade_.reserve(count);
  for (size_t i = count; i-- > 0;) unmade_.push_back(static_cast<int>(i));  // slot 0 made first
}

int BufferPool::acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (cancelled_) return -1;
    if (!free_.empty()) {
      int index = free_.back();
      free_.pop_back();
      return index;
    }
    if (!unmade_.empty()) break;
    cv_.wait(lock);
  }
  // Make a new buffer outside the lock: page-locking is slow and may run in parallel.
  int index = unmade_.back();
  unmade_.pop_back();
  making_++;
  lock.unlock();
  HostBuffer buffer;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [t0] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  try {
    buffer = allocator_(buffer_size_);
  } catch (...) {
    const double seconds = elapsed();
    lock.lock();
    alloc_seconds_ += seconds;
    making_--;
    unmade_.push_back(index);  // exactly this slot stays empty; another acquire may retry it
    failed_ = true;
    lock.unlock();
    cv_.notify_one();
    throw;
  }
  const double seconds = elapsed();
  lock.lock();
  alloc_seconds_ += seconds;
  buffers_[index] = std::move(buffer);
  making_--;
  ready_++;
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
  return !failed_ && making_ == 0 && free_.size() == ready_;
}

double BufferPool::alloc_seconds() const {
  std::lock_guard<std::mutex> lock(mu_);
  return alloc_seconds_;
}

size_t BufferPool::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_ * buffer_size_;
}

}  // namespace sllm
