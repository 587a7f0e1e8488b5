// Chunk checksums: XXH3-64 (seed 0) from the vendored xxHash library (csrc/third_party/xxhash).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace sllm {

uint64_t xxh3_64(const void* data, size_t size);

// The XXH3-64 of bytes given piece by piece (the same digest as xxh3_64 of them all).
class Xxh3 {
 public:
  Xxh3();
  ~Xxh3();
  Xxh3(const Xxh3&) = delete;
  Xxh3& operator=(const Xxh3&) = delete;

  void update(const void* data, size_t size);
  // Copies [src, src + size) to dst and hashes it, in one pass: block by block, each block of
  // src hashed, then copied while it is still in the CPU cache (one read of src from memory, not
  // two), with non-temporal stores (dst is written to memory without being read into the cache:
  // meant for buffers that a DMA reads next). src must not change meanwhile.
  void copy_update(void* dst, const void* src, size_t size);
  uint64_t digest() const;
  void reset();  // back to no bytes

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Splits a byte stream into fixed-size chunks and records the XXH3-64 digest of each one.
// Used by the writer, which streams tensors of arbitrary size into a data file.
class ChunkHasher {
 public:
  explicit ChunkHasher(uint64_t chunk_size);
  ~ChunkHasher();
  ChunkHasher(const ChunkHasher&) = delete;
  ChunkHasher& operator=(const ChunkHasher&) = delete;

  void update(const void* data, size_t size);
  // Closes the last (possibly short) chunk and returns one digest per chunk.
  std::vector<uint64_t> finish();
  uint64_t bytes_seen() const { return total_; }

 private:
  Xxh3 hash_;
  uint64_t chunk_size_;
  uint64_t in_chunk_ = 0;
  uint64_t total_ = 0;
  std::vector<uint64_t> digests_;
};

}  // namespace sllm
