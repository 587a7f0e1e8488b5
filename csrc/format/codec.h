// Chunk codecs of compressed checkpoints (docs/format.md, "Compression").
//
// A stored chunk is either raw bytes or one zstd frame (with its content checksum, so corrupted
// data fails to decode rather than producing wrong bytes, unless the caller checks the chunk's
// own checksum of the decoded bytes instead). Before compression the writer may have
// "byte-grouped" the chunk: for group size g > 1 the first floor(n/g)*g bytes are rearranged into
// g streams, stream k holding byte k of every g-byte element, and the tail is kept as is. The
// exponent bytes of bf16/fp16/fp32 values then sit together and compress far better.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace sllm {

enum class Codec : int { kNone = 0, kZstd = 1 };

class Xxh3;

// Undoes byte grouping: src (grouped, n bytes) -> dst (element order). group 1 copies. `hash`:
// also fed the bytes of dst, piece by piece as they are written (while they are in the CPU's
// cache).
void ungroup_bytes(const char* src, char* dst, size_t n, int group, Xxh3* hash = nullptr);
// The writer's transform, for tests and tools: dst = grouped src.
void group_bytes(const char* src, char* dst, size_t n, int group);

// One decoder per thread (holds a zstd decompression context).
class ChunkDecoder {
 public:
  ChunkDecoder();
  ~ChunkDecoder();
  ChunkDecoder(const ChunkDecoder&) = delete;
  ChunkDecoder& operator=(const ChunkDecoder&) = delete;

  // Decodes `src` (stored_len bytes) into exactly raw_len bytes at `dst`. `scratch` must hold
  // raw_len bytes when group > 1. Throws sllm::Error(kChecksum) naming `what` if the data does not
  // decode to exactly raw_len bytes, or a zstd frame fails its own content checksum (corruption).
  // `hash`: fed the decoded bytes as they are written, for the caller to check against the
  // chunk's checksum; the frame's content checksum, which covers the same bytes, is then skipped.
  void decode(Codec codec, int group, const char* src, size_t stored_len, char* dst, size_t raw_len,
              char* scratch, const std::string& what, Xxh3* hash = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sllm
