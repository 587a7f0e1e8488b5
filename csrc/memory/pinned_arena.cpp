#include "memory/pinned_arena.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "common/errors.h"
#include "common/threads.h"
#include "device/cuda_device.h"
#include "device/cuda_driver.h"

namespace sllm {

PinnedArena::PinnedArena(size_t size, size_t segment_size, bool pin, int threads) {
  if (segment_size == 0 || segment_size % 4096 != 0)
    throw Error(ErrorKind::kFormat, "arena segment size must be a positive multiple of 4096");
  size_t count = (size + segment_size - 1) / segment_size;
  segment_size_ = segment_size;
  pinned_ = pin && cuda::device_count() > 0;

  HostAllocator alloc = allocate_aligned_host;
  if (pinned_) {
    auto cuda_dev = std::make_shared<CudaDevice>(0);
    alloc = cuda_dev->staging_allocator();  // registered PORTABLE: every GPU DMAs from it
    device_ = cuda_dev;
  }
  const bool touch = !pinned_;
  const long page = ::sysconf(_SC_PAGESIZE) > 0 ? ::sysconf(_SC_PAGESIZE) : 4096;

  segments_.resize(count);
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
  auto work = [&] {
    try {
      for (size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        HostBuffer b = alloc(segment_size);
        if (touch) {
          char* p = static_cast<char*>(b.data());
          for (size_t o = 0; o < segment_size; o += static_cast<size_t>(page)) p[o] = 0;
        }
        segments_[i] = std::move(b);
        std::lock_guard<std::mutex> lock(mu);
        if (error) return;
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
      next.store(count);
    }
  };
  int n = std::max(1, std::min<int>(threads, static_cast<int>(std::max<size_t>(count, 1))));
  {
    ThreadGroup pool;
    try {
      for (int t = 0; t < n; ++t) pool.spawn(work);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
      next.store(count);  // the threads started stop; the group joins them
    }
  }
  if (error) {
    segments_.clear();
    device_.reset();
    try {
      std::rethrow_exception(error);
    } catch (const Error& e) {
      throw Error(ErrorKind::kOutOfMemory, "cannot allocate the " + std::to_string(count * segment_size) +
                                               "-byte memory pool: " + e.what());
    }
  }
  size_ = count * segment_size;
}

void PinnedArena::release() {
  segments_.clear();
  device_.reset();
  size_ = 0;
}

}  // namespace sllm
