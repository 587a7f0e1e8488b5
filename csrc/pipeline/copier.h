// Memory-to-memory copies from host memory (the store server's cache) into destinations (a
// client's GPU memory or shared host memory), spread over worker threads and, for GPUs, over
// one stream per worker. Blocks until every copy has completed.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "pipeline/plan.h"

namespace sllm {

struct CopySpec {
  const char* src = nullptr;
  int dest = 0;
  uint64_t dest_offset = 0;
  uint64_t length = 0;
};

struct CopyStats {
  uint64_t bytes = 0;
  uint64_t pieces = 0;
  int threads = 0;
  double seconds = 0;
};

// Throws sllm::Error(kFormat) for a copy outside its destination, the device's error if a copy
// fails, and kCancelled if `cancelled` (polled between pieces) turns true.
CopyStats run_copies(const std::vector<CopySpec>& copies, const std::vector<Destination>& dests,
                     int num_threads, uint64_t piece_size, const std::function<bool()>& cancelled);

}  // namespace sllm
