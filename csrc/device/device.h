// The destination side of the pipeline: where loaded bytes end up.
//
// The pipeline only talks to this interface, so adding a device kind (CUDA) adds a class and a
// registry entry, not pipeline changes. Copies may be asynchronous: a staging buffer handed to
// copy_from_host() must stay untouched until wait() on the token that record() returned after it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "memory/host_buffer.h"

namespace sllm {

class Device {
 public:
  virtual ~Device() = default;

  virtual std::string name() const = 0;

  // True when destination memory is ordinary host memory that file reads may fill directly,
  // skipping the staging buffer.
  virtual bool host_addressable() const = 0;

  // Called once before workers start, with the number of workers that will call in.
  virtual void begin(int num_workers) {}

  // Copies n bytes from host memory `src` to destination memory `dst`, on behalf of `worker`.
  virtual void copy_from_host(void* dst, const void* src, size_t n, int worker) = 0;

  // Copies n bytes from destination memory `src` back to host memory `dst` (the remote tier
  // writes its cache from what it loaded). Asynchronous like copy_from_host: wait() on a token
  // recorded after it before reading dst. Host memory: a plain copy.
  virtual void copy_to_host(void* dst, const void* src, size_t n, int worker) { std::memcpy(dst, src, n); }

  // Marks the copies issued so far by `worker`; wait(worker, token) blocks until they are done.
  virtual uint64_t record(int worker) { return 0; }
  virtual void wait(int worker, uint64_t token) {}

  // Makes `stream` (a stream of this device, as the driver's handle: a consumer's, e.g. PyTorch's
  // current stream) wait, on the device, for the copies recorded as `token` by `worker`; returns
  // at once. Thread-safe against the worker's own calls. Host memory: nothing to wait for.
  virtual void stream_wait(int worker, uint64_t token, uintptr_t stream) {}

  // Blocks until every copy issued by any worker has completed (called after workers joined).
  virtual void synchronize() {}

  // Blocks until every copy `worker` issued has finished, whatever their outcome, and never
  // throws: error paths call it before giving the worker's staging buffers back.
  virtual void drain(int worker) noexcept {}

  // Makes staging buffers suited to this device (page-locked for DMA-capable devices).
  virtual HostAllocator staging_allocator() const { return allocate_aligned_host; }

  // Hint that [dst, dst+n) is about to be written in full (e.g. transparent huge pages).
  virtual void prepare_destination(void* dst, size_t n) {}
};

// Makes the device for a torch-style device string ("cpu", "cuda:0", ...); throws
// sllm::Error(kDevice) for kinds that are unknown or not available in this process.
std::shared_ptr<Device> make_device(const std::string& spec);

}  // namespace sllm
