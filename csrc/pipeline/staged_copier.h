// Copies of downloaded chunks into their destinations (the remote tier's streamed load).
//
// Each chunk goes through one of a few reused page-locked staging buffers: one pass copies it
// there and computes its checksum, then DMAs take it to the GPU from there. The driver's own
// copy from pageable memory stages through its buffers more slowly (3.49 vs 4.10 GB/s on the
// H100 machine, bench_remote --stages), and a separate checksum pass reads every byte from
// memory once more. Destinations in host memory get plain copies. Thread-safe: every calling
// thread takes a free buffer (and its stream) for the length of its call.
//
// Page-locked memory is slow to make (about 33 ms per 32 MiB on the H200 machine, and the driver
// makes one buffer at a time), so a thread of the copier's own makes the buffers from the moment
// it is constructed, while the load's first GETs are in flight; each buffer comes into service
// when it is made, rather than on the first copy that needs it.
//
// read_back() goes the other way, for the remote tier's cache: it copies a chunk's pieces back
// from their destinations into one of `readers` page-locked buffers of its own (made after the
// staging buffers, with a stream each) and checksums it there. The cache is then written from
// that buffer, so that the GET's own buffer is freed as soon as the chunk is on the device
// instead of waiting, in fresh memory, for the disk.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "memory/host_buffer.h"
#include "pipeline/plan.h"

namespace sllm {

class StagedCopier {
 public:
  struct Piece {
    uint64_t chunk_offset = 0;  // in the chunk
    int dest = 0;
    uint64_t dest_offset = 0;
    uint64_t length = 0;
  };

  // dests: where pieces go (several may share one Device); staging_size: the largest chunk;
  // slots: buffers (and streams), made on a thread of the copier's own when a destination is
  // a device (none for host memory only); readers: read_back() buffers (and streams), made
  // after them.
  StagedCopier(std::vector<Destination> dests, size_t staging_size, int slots, int readers = 0);
  ~StagedCopier();
  StagedCopier(const StagedCopier&) = delete;
  StagedCopier& operator=(const StagedCopier&) = delete;

  // Copies the pieces of chunk [src, src + n) into their destinations and returns the chunk's
  // XXH3-64; returns when the copies are complete. Throws sllm::Error(kFormat) for a piece
  // outside the chunk or its destination, and the device's error if a copy fails.
  uint64_t copy(const char* src, size_t n, const std::vector<Piece>& pieces);

  // Copies the pieces of a chunk of n bytes back from their destinations into a buffer (bytes
  // between pieces are zero), then calls use(buffer, XXH3-64 of it) and returns; the buffer is
  // another call's afterwards. Through a reader's page-locked buffer when there is one (it is
  // 4 KiB-aligned and up to staging_size long), else a temporary aligned one. Throws like copy().
  void read_back(const std::vector<Piece>& pieces, size_t n,
                 const std::function<void(const char*, uint64_t)>& use);
  // Whether any destination is a device (not host memory): only then is there staging.
  bool to_device() const { return !devices_.empty(); }
  // False once page-locked memory could not be had (copies then go from the chunk itself);
  // pin_error() says why.
  bool staged() const;
  std::string pin_error() const;
  // Staging buffers made so far.
  int buffers() const;
  // Thread-seconds spent making staging buffers, and waiting for a free one (load reports).
  double alloc_seconds() const { return static_cast<double>(alloc_ns_.load()) * 1e-9; }
  double wait_seconds() const { return static_cast<double>(wait_ns_.load()) * 1e-9; }

 private:
  // Staging slots, or readers: a buffer each, and the free ones, handed out one per call. An
  // index is free only once its buffer is made (or cannot be).
  struct FreeList {
    std::vector<HostBuffer> buffers;  // by index; none if it could not be made
    std::vector<int> free;
    std::condition_variable freed;
  };
  struct Lease;  // an index of a FreeList for the length of a call
  int take(FreeList& list, bool timed);
  void give(FreeList& list, int index);
  void check(const std::vector<Piece>& pieces, size_t n) const;
  void make_buffers();  // the buffer-making thread

  std::vector<Destination> dests_;
  std::vector<Device*> devices_;  // distinct devices of dests_ that are not host memory
  size_t staging_size_;
  mutable std::mutex mu_;
  int made_ = 0;
  FreeList slots_;    // stream index: the slot
  FreeList readers_;  // stream index: slots + the reader
  std::atomic<bool> unpinned_{false};  // page-locked allocation failed: no staging from now on
  std::string pin_error_;              // why (guarded by mu_)
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> alloc_ns_{0};
  std::atomic<int64_t> wait_ns_{0};
  std::thread maker_;  // last: started once every other member is ready
};

}  // namespace sllm
