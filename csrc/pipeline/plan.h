// What a load does, decided in Python from the index: which byte ranges (chunks) of which files
// to read, and where each piece of a chunk (a segment) goes in which destination.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device/device.h"
#include "io/file_reader.h"
#include "pipeline/progress.h"

namespace sllm {

struct ChunkSpec {
  int file = 0;
  uint64_t offset = 0;  // of the raw (decoded) bytes in the file's logical byte stream
  uint64_t length = 0;  // raw bytes
  bool has_checksum = false;
  uint64_t checksum = 0;  // of the raw bytes
  // Where the chunk is stored and how (compressed files; for plain files stored == raw).
  bool encoded = false;
  uint64_t stored_offset = 0;  // 4096-aligned in the data file
  uint64_t stored_length = 0;
  int codec = 0;  // Codec
  int group = 1;  // byte-grouping element size (1 = none)
};

struct Segment {
  int chunk = 0;
  uint64_t chunk_offset = 0;
  int dest = 0;
  uint64_t dest_offset = 0;
  uint64_t length = 0;
};

struct Destination {
  std::shared_ptr<Device> device;
  char* base = nullptr;
  uint64_t size = 0;
};

struct LoadOptions {
  int num_threads = 8;
  IoMode io_mode = IoMode::kBuffered;
  bool verify = false;
  // Staging buffers per worker (2 = double buffering: one in flight to the device, one filling).
  int buffers_per_thread = 2;
  // When set, each chunk is marked as its bytes land in their destinations, and a cancel()
  // on it stops the load (as an interrupt does).
  std::shared_ptr<Progress> progress;
};

struct LoadPlan {
  std::vector<std::string> files;
  std::vector<ChunkSpec> chunks;
  std::vector<Segment> segments;
  std::vector<Destination> dests;
};

struct LoadStats {
  uint64_t bytes_read = 0;
  uint64_t chunks_direct = 0;   // read straight into destination memory (whole, or piece by piece)
  uint64_t chunks_staged = 0;   // read into a staging buffer, then copied
  uint64_t chunks_verified = 0;
  bool o_direct_used = false;   // at least one read went through O_DIRECT
  uint64_t direct_reads = 0;    // reads done with O_DIRECT (the rest were buffered or mapped)
  int threads = 0;
  double seconds = 0;
  double staging_alloc_seconds = 0;  // thread-seconds spent making staging buffers (0: pool reused)
};

}  // namespace sllm
