// Which chunks of a running load are complete in their destinations, for callers that use the
// tensors before the load ends (streaming loads). Worker threads mark chunks as their bytes land
// (read and checked for host memory; copied, the copy finished, for a device); any thread may
// wait for a set of chunks. The load's owner closes it when the load ends, however it ends.
//
// A chunk bound for a device is first *queued*: read, checked, and its copies issued on the
// device, with a record after them. A consumer can then make a stream of its own wait for those
// copies on the device (stream_wait) instead of waiting on the host for them to finish.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device/device.h"

namespace sllm {

class Progress {
 public:
  // The copies of a chunk queued on one device: `worker`'s copies recorded as `token`.
  struct Queued {
    std::shared_ptr<Device> device;
    int worker = 0;
    uint64_t token = 0;
  };

  explicit Progress(size_t chunks) : state_(chunks, kPending), queued_(chunks) {}

  size_t chunks() const { return state_.size(); }

  // The chunk's bytes are in place (and checked when verifying). Out-of-range indices are ignored.
  void mark(size_t chunk, uint64_t bytes);

  // The chunk's bytes are checked and their copies to the devices are queued (not yet done).
  // Ignored for a chunk already marked, and once closed.
  void queue(size_t chunk, std::vector<Queued> copies);

  // The load ended (complete, failed or cancelled): waiters wake up and stop waiting. Queued
  // chunks that were not marked never will be.
  void close();

  // Asks the load to stop; the pipeline polls it.
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  // Blocks until every listed chunk is marked (or, `queued`, at least queued), the progress is
  // closed, or timeout_s passes (negative: no limit). Returns whether every listed chunk is so.
  bool wait(const std::vector<int64_t>& chunks, double timeout_s, bool queued = false);

  // Makes `stream`, a stream of the device named `device` ("cuda:0"), wait on the device for the
  // listed chunks' copies to that device; returns at once. False (and nothing waits) if a chunk
  // is neither marked nor queued, as wait(chunks, t, true) would answer.
  bool stream_wait(const std::vector<int64_t>& chunks, uintptr_t stream, const std::string& device);

  bool all_marked(const std::vector<int64_t>& chunks) const;
  uint64_t bytes() const;
  size_t marked() const;
  bool closed() const;

 private:
  enum State : uint8_t { kPending, kQueued, kMarked };
  bool all_at_least_locked(const std::vector<int64_t>& chunks, State s) const;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<State> state_;
  std::vector<std::vector<Queued>> queued_;  // of the chunks in kQueued
  size_t marked_ = 0;
  uint64_t bytes_ = 0;
  bool closed_ = false;
  std::atomic<bool> cancelled_{false};
};

}  // namespace sllm
