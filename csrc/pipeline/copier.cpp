#include "pipeline/copier.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "common/errors.h"
#include "common/threads.h"

namespace sllm {

CopyStats run_copies(const std::vector<CopySpec>& copies, const std::vector<Destination>& dests,
                     int num_threads, uint64_t piece_size, const std::function<bool()>& cancelled) {
  auto t0 = std::chrono::steady_clock::now();
  if (piece_size == 0) piece_size = 64ull << 20;
  std::vector<CopySpec> pieces;
  uint64_t total = 0;
  for (const auto& c : copies) {
    if (c.dest < 0 || static_cast<size_t>(c.dest) >= dests.size() || !dests[c.dest].device)
      throw Error(ErrorKind::kFormat, "copy refers to destination #" + std::to_string(c.dest));
    const auto& d = dests[c.dest];
    if (c.dest_offset + c.length > d.size || c.dest_offset + c.length < c.dest_offset)
      throw Error(ErrorKind::kFormat, "copy exceeds its destination (" + std::to_string(c.dest_offset) + "+" +
                                          std::to_string(c.length) + " > " + std::to_string(d.size) + ")");
    for (uint64_t off = 0; off < c.length; off += piece_size) {
      uint64_t n = std::min(piece_size, c.length - off);
      pieces.push_back(CopySpec{c.src + off, c.dest, c.dest_offset + off, n});
    }
    total += c.length;
  }
  int threads = std::max(1, std::min<int>(num_threads, static_cast<int>(std::max<size_t>(1, pieces.size()))));
  for (const auto& d : dests) d.device->begin(threads);

  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::exception_ptr error;
  auto worker = [&](int id) {
    try {
      for (size_t i = next.fetch_add(1); i < pieces.size() && !stop.load(); i = next.fetch_add(1)) {
        const CopySpec& p = pieces[i];
        const Destination& d = dests[p.dest];
        d.device->copy_from_host(d.base + p.dest_offset, p.src, p.length, id);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
      stop.store(true);
    }
  };
  bool was_cancelled = false;
  {
    ThreadGroup group;
    try {
      for (int i = 0; i < threads; ++i) group.spawn([&worker, i] { worker(i); });
    } catch (...) {
      stop.store(true);  // the workers started stop; the group joins them
      throw;
    }
    // Poll for cancellation while the workers run (they also stop on the first error).
    while (cancelled && next.load() < pieces.size() && !stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (cancelled()) {
        was_cancelled = true;
        stop.store(true);
      }
    }
    group.join();
  }
  for (const auto& d : dests) {
    try {
      d.device->synchronize();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  if (was_cancelled) throw Error(ErrorKind::kCancelled, "copy cancelled");
  CopyStats s;
  s.bytes = total;
  s.pieces = pieces.size();
  s.threads = threads;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

}  // namespace sllm
