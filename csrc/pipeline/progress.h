// Which chunks of a running load are complete in their destinations, for callers that use the
// tensors before the load ends (streaming loads). Worker threads mark chunks as their bytes land
// (read and checked for host memory; copied, the copy finished, for a device); any thread may
// wait for a set of chunks. The load's owner closes it when the load ends, however it ends.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace sllm {

class Progress {
 public:
  explicit Progress(size_t chunks) : done_(chunks, 0) {}

  size_t chunks() const { return done_.size(); }

  // The chunk's bytes are in place (and checked when verifying). Out-of-range indices are ignored.
  void mark(size_t chunk, uint64_t bytes);

  // The load ended (complete, failed or cancelled): waiters wake up and stop waiting.
  void close();

  // Asks the load to stop; the pipeline polls it.
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  // Blocks until every listed chunk is marked, the progress is closed, or timeout_s passes
  // (negative: no limit). Returns whether every listed chunk is marked.
  bool wait(const std::vector<int64_t>& chunks, double timeout_s);

  bool all_marked(const std::vector<int64_t>& chunks) const;
  uint64_t bytes() const;
  size_t marked() const;
  bool closed() const;

 private:
  bool all_marked_locked(const std::vector<int64_t>& chunks) const;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> done_;
  size_t marked_ = 0;
  uint64_t bytes_ = 0;
  bool closed_ = false;
  std::atomic<bool> cancelled_{false};
};

}  // namespace sllm
