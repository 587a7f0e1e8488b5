#include "pipeline/progress.h"

#include <algorithm>
#include <chrono>
#include <utility>

namespace sllm {

void Progress::mark(size_t chunk, uint64_t bytes) {
  std::vector<Queued> done;  // released outside the lock (a device's last owner tears it down)
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (chunk >= state_.size() || state_[chunk] == kMarked) return;
    state_[chunk] = kMarked;
    done.swap(queued_[chunk]);
    marked_++;
    bytes_ += bytes;
  }
  cv_.notify_all();
}

void Progress::queue(size_t chunk, std::vector<Queued> copies) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ || chunk >= state_.size() || state_[chunk] != kPending) return;
    state_[chunk] = kQueued;
    queued_[chunk] = std::move(copies);
  }
  cv_.notify_all();
}

void Progress::close() {
  std::vector<std::vector<Queued>> dropped(state_.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    for (size_t i = 0; i < state_.size(); ++i) {
      if (state_[i] == kQueued) state_[i] = kPending;  // its copies were never seen to finish
      dropped[i].swap(queued_[i]);
    }
  }
  cv_.notify_all();
}

bool Progress::all_at_least_locked(const std::vector<int64_t>& chunks, State s) const {
  for (int64_t c : chunks)
    if (c < 0 || static_cast<size_t>(c) >= state_.size() || state_[c] < s) return false;
  return true;
}

bool Progress::wait(const std::vector<int64_t>& chunks, double timeout_s, bool queued) {
  const State want = queued ? kQueued : kMarked;
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [&] { return closed_ || all_at_least_locked(chunks, want); };
  if (timeout_s < 0) {
    cv_.wait(lock, ready);
  } else {
    cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
  }
  return all_at_least_locked(chunks, want);
}

bool Progress::stream_wait(const std::vector<int64_t>& chunks, uintptr_t stream, const std::string& device) {
  std::vector<Queued> waits;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!all_at_least_locked(chunks, kQueued)) return false;
    for (int64_t c : chunks)
      for (const Queued& q : queued_[c]) {
        if (q.device->name() != device) continue;
        // A worker's copies run in order on its stream: its latest token covers the earlier ones.
        auto same = std::find_if(waits.begin(), waits.end(), [&](const Queued& w) {
          return w.device == q.device && w.worker == q.worker;
        });
        if (same == waits.end())
          waits.push_back(q);  // holds the device: it outlives the lock
        else
          same->token = std::max(same->token, q.token);
      }
  }
  for (const Queued& q : waits) q.device->stream_wait(q.worker, q.token, stream);
  return true;
}

bool Progress::all_marked(const std::vector<int64_t>& chunks) const {
  std::lock_guard<std::mutex> lock(mu_);
  return all_at_least_locked(chunks, kMarked);
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
