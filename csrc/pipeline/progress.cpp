#include "pipeline/progress.h"

#include <chrono>

namespace sllm {

void Progress::mark(size_t chunk, uint64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (chunk >= done_.size() || done_[chunk]) return;
    done_[chunk] = 1;
    marked_++;
    bytes_ += bytes;
  }
  cv_.notify_all();
}

void Progress::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

bool Progress::all_marked_locked(const std::vector<int64_t>& chunks) const {
  for (int64_t c : chunks)
    if (c < 0 || static_cast<size_t>(c) >= done_.size() || !done_[c]) return false;
  return true;
}

bool Progress::wait(const std::vector<int64_t>& chunks, double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [&] { return closed_ || all_marked_locked(chunks); };
  if (timeout_s < 0) {
    cv_.wait(lock, ready);
  } else {
    cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
  }
  return all_marked_locked(chunks);
}

bool Progress::all_marked(const std::vector<int64_t>& chunks) const {
  std::lock_guard<std::mutex> lock(mu_);
  return all_marked_locked(chunks);
}

uint64_t Progress::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

size_t Progress::marked() const {
  std::lock_guard<std::mutex> lock(mu_);
  return marked_;
}

bool Progress::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

}  // namespace sllm
