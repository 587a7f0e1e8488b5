// Copies of downloaded chunks into their destinations (the remote tier's load while downloading).
//
// For a GPU, a chunk goes through small reused page-locked staging blocks: its bytes are copied
// into a block and checksummed in one pass, and each full block is DMAed to where its bytes go
// while the next one fills. A chunk's bytes may come in pieces (fill(): the pieces of a GET's
// body as they arrive, copied while they are still in the CPU cache; no buffer for the whole
// body is ever made) or at once (copy()). The driver's own copy from pageable memory stages
// through its buffers more slowly (about 15 % slower), and a separate checksum pass would read
// every byte from memory once more.
// Destinations in host memory get plain copies. Thread-safe: every fill holds at most two
// blocks (and their streams) at a time.
//
// Page-locked memory is slow to make (about 1 ms per MiB, and the driver
// makes one buffer at a time), so a thread of the copier's own makes the blocks from the moment
// it is constructed, while the load's first GETs are in flight; each block comes into service
// when it is made, rather than on the first copy that needs it.
//
// read_back() goes the other way, for the remote tier's cache: it copies a chunk's pieces back
// from their destinations into one of `readers` page-locked buffers of its own (made after the
// staging blocks, with a stream each) and checksums it there. The cache is then written from
// that buffer, so that no host copy of the chunk waits, in fresh memory, for the disk.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "format/checksum.h"
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

  class Fill;

  // dests: where pieces go (several may share one Device); block_size, blocks: the staging
  // blocks (and a stream each), made on a thread of the copier's own when a destination is a
  // device (none for host memory only); readers: read_back() buffers of reader_size bytes
  // (the largest chunk; and a stream each), made after them.
  StagedCopier(std::vector<Destination> dests, size_t block_size, int blocks, int readers = 0,
               size_t reader_size = 0);
  ~StagedCopier();
  StagedCopier(const StagedCopier&) = delete;
  StagedCopier& operator=(const StagedCopier&) = delete;

  // Starts copying the pieces of a chunk of n bytes into their destinations; the chunk's bytes
  // are then given in order (Fill::add). Throws sllm::Error(kFormat) for a piece outside the
  // chunk or its destination.
  std::unique_ptr<Fill> fill(size_t n, std::vector<Piece> pieces);
  // fill() of chunk [src, src + n) at once: returns its XXH3-64 when the copies are complete.
  // Throws like fill(), and the device's error if a copy fails.
  uint64_t copy(const char* src, size_t n, const std::vector<Piece>& pieces);

  // Copies the pieces of a chunk of n bytes back from their destinations into a buffer (bytes
  // between pieces are zero), then calls use(buffer, XXH3-64 of it) and returns; the buffer is
  // another call's afterwards. Through a reader's page-locked buffer when there is one (it is
  // 4 KiB-aligned and up to reader_size long), else a temporary aligned one. Throws like copy().
  void read_back(const std::vector<Piece>& pieces, size_t n,
                 const std::function<void(const char*, uint64_t)>& use);
  // Whether any destination is a device (not host memory): only then is there staging.
  bool to_device() const { return !devices_.empty(); }
  // False once page-locked memory could not be had (copies then go from the chunk itself);
  // pin_error() says why.
  bool staged() const;
  std::string pin_error() const;
  // Staging blocks made so far.
  int buffers() const;
  // Thread-seconds spent making staging blocks, and waiting for a free one (load reports).
  double alloc_seconds() const { return static_cast<double>(alloc_ns_.load()) * 1e-9; }
  double wait_seconds() const { return static_cast<double>(wait_ns_.load()) * 1e-9; }

 private:
  // Staging blocks, or readers: a buffer each, and the free ones, handed out one at a time.
  // An index is free only once its buffer is made (or cannot be).
  struct FreeList {
    std::vector<HostBuffer> buffers;  // by index; none if it could not be made
    std::vector<int> free;
    std::condition_variable freed;
  };
  struct Lease;  // an index of a FreeList for the length of a call
  int take(FreeList& list, bool timed);
  int try_take(FreeList& list);  // -1 if none is free
  void give(FreeList& list, int index);
  void check(const std::vector<Piece>& pieces, size_t n) const;
  void make_buffers();  // the buffer-making thread

  std::vector<Destination> dests_;
  std::vector<Device*> devices_;  // distinct devices of dests_ that are not host memory
  size_t block_size_;
  size_t reader_size_;
  mutable std::mutex mu_;
  int made_ = 0;
  FreeList blocks_;   // stream index: the block
  FreeList readers_;  // stream index: blocks + the reader
  std::atomic<bool> unpinned_{false};  // page-locked allocation failed: no staging from now on
  std::string pin_error_;              // why (guarded by mu_)
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> alloc_ns_{0};
  std::atomic<int64_t> wait_ns_{0};
  std::thread maker_;  // last: started once every other member is ready
};

// One chunk on its way through a StagedCopier: its bytes go into a staging block, in order, and
// each full block is copied on to the pieces' destinations while the next fills. Destroying a
// Fill (finished or not) waits for its copies and gives its blocks back.
class StagedCopier::Fill {
 public:
  Fill(StagedCopier& copier, size_t n, std::vector<Piece> pieces);
  ~Fill();
  Fill(const Fill&) = delete;
  Fill& operator=(const Fill&) = delete;

  // The chunk's next bytes. Throws sllm::Error(kFormat) past the chunk's end, and the
  // device's error if a copy fails.
  void add(const char* src, size_t len);
  // Waits for the copies and returns the chunk's XXH3-64. Throws sllm::Error(kFormat) if fewer
  // than n bytes were added.
  uint64_t finish();
  size_t added() const { return pos_; }

 private:
  struct Sent {  // a block whose copies may still be running
    int block;
    std::vector<uint64_t> tokens;  // per device
  };
  // Copies the chunk's bytes [lo, hi), at `from`, to the pieces' destinations on `stream`.
  Sent send(const char* from, uint64_t lo, uint64_t hi, int block);
  void retire();  // waits for the oldest sent block's copies and gives the block back
  void take_block();  // a free block to fill (waiting for one holding none)
  void filled(size_t k);  // k more bytes are in the block: sends it on if full
  void release() noexcept;      // waits for every copy and gives every block back

  StagedCopier& c_;
  const size_t n_;
  const std::vector<Piece> pieces_;
  Xxh3 hash_;
  size_t pos_ = 0;
  int block_ = -1;          // the block being filled, if any
  uint64_t block_from_ = 0;  // the chunk offset of its first byte
  std::deque<Sent> sent_;
};

}  // namespace sllm
