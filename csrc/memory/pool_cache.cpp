#include "memory/pool_cache.h"

#include <map>
#include <mutex>
#include <vector>

namespace sllm {

namespace {

struct Cache {
  std::mutex mu;
  std::multimap<std::string, std::unique_ptr<BufferPool>> idle;
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
  if (!pool_ || !pool_->reset()) return;  // a pool with buffers still out is dropped
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.idle.emplace(key_, std::move(pool_));
}

std::unique_ptr<PoolLease> lease_pool(const std::string& kind, size_t count, size_t size,
                                      const HostAllocator& allocator) {
  std::string key = kind + "/" + std::to_string(count) + "x" + std::to_string(size);
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.idle.find(key);
    if (it != c.idle.end()) {
      auto pool = std::move(it->second);
      c.idle.erase(it);
      return std::make_unique<PoolLease>(key, std::move(pool));
    }
  }
  return std::make_unique<PoolLease>(key, std::make_unique<BufferPool>(count, size, allocator));
}

}  // namespace sllm
