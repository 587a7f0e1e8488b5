#include "memory/pool_cache.h"

#include <iterator>
#include <list>
#include <mutex>
#include <vector>

namespace sllm {

namespace {

// Idle pools kept for later loads, at most this many bytes of buffers (the newest pool is always
// kept): enough for the staging pools of two load configurations (16 threads x 2 x 32 MiB each).
constexpr size_t kMaxIdleBytes = 2ull << 30;

struct Idle {
  std::string key;
  std::unique_ptr<BufferPool> pool;
  size_t bytes;
};

struct Cache {
  std::mutex mu;
  std::list<Idle> idle;  // least recently returned first
  size_t bytes = 0;
};

// Deliberately never destroyed: page-locked buffers must not be freed during static destruction,
// after the CUDA driver may already have been torn down. The OS reclaims them at exit.
Cache& cache() {
  static Cache* c = new Cache();  // NOLINT: intentional process-lifetime singleton
  return *c;
}

}  // namespace

PoolLease::PoolLease(std::string key, std::unique_ptr<BufferPool> pool)
    : key_(std::move(key)), pool_(std::move(pool)) {}

PoolLease::~PoolLease() {
  if (!pool_ || !pool_->reset()) return;  // buffers still out, or a failed allocation: dropped
  std::list<Idle> evicted;                 // freed outside the lock
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    size_t bytes = pool_->allocated_bytes();
    c.idle.push_back(Idle{key_, std::move(pool_), bytes});
    c.bytes += bytes;
    while (c.bytes > kMaxIdleBytes && c.idle.size() > 1) {
      c.bytes -= c.idle.front().bytes;
      evicted.splice(evicted.end(), c.idle, c.idle.begin());
    }
  }
}

std::unique_ptr<PoolLease> lease_pool(const std::string& kind, size_t count, size_t size,
                                      const HostAllocator& allocator) {
  std::string key = kind + "/" + std::to_string(count) + "x" + std::to_string(size);
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto it = c.idle.rbegin(); it != c.idle.rend(); ++it) {
      if (it->key != key) continue;
      auto pool = std::move(it->pool);
      c.bytes -= it->bytes;
      c.idle.erase(std::next(it).base());
      return std::make_unique<PoolLease>(key, std::move(pool));
    }
  }
  return std::make_unique<PoolLease>(key, std::make_unique<BufferPool>(count, size, allocator));
}

}  // namespace sllm
