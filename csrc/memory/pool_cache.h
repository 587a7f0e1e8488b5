// Process-wide cache of staging pools, so that page-locked buffers (which take time to create:
// faulting the pages in, then registering them) are made once per process and reused by every
// later load. Idle pools are kept up to 2 GiB of buffers, least recently used dropped first; each
// page-locked buffer holds a reference on its device's primary context, so the context outlives
// the cached pools.
#pragma once

#include <memory>
#include <string>

#include "memory/buffer_pool.h"

namespace sllm {

// A pool on loan from the cache; returned to it (reset) when the lease is destroyed.
class PoolLease {
 public:
  PoolLease(std::string key, std::unique_ptr<BufferPool> pool);
  ~PoolLease();
  PoolLease(const PoolLease&) = delete;
  PoolLease& operator=(const PoolLease&) = delete;
  BufferPool* operator->() const { return pool_.get(); }
  BufferPool& operator*() const { return *pool_; }

 private:
  std::string key_;
  std::unique_ptr<BufferPool> pool_;
};

// A pool of `count` buffers of `size` bytes made by `allocator`; `kind` names the allocator
// (e.g. "host", or the device name "cuda:0" for its page-locked buffers) since pools of different kinds are not interchangeable.
std::unique_ptr<PoolLease> lease_pool(const std::string& kind, size_t count, size_t size,
                                      const HostAllocator& allocator);

}  // namespace sllm
