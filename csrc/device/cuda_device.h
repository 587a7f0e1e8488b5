// A CUDA GPU as a destination: asynchronous host-to-device copies from page-locked staging
// buffers, one stream per worker thread, on the device's primary context (the one PyTorch uses).
#pragma once

#include <memory>
#include <vector>

#include "device/cuda_driver.h"
#include "device/device.h"

namespace sllm {

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int ordinal);
  ~CudaDevice() override;

  std::string name() const override { return "cuda:" + std::to_string(ordinal_); }
  bool host_addressable() const override { return false; }
  void begin(int num_workers) override;
  void copy_from_host(void* dst, const void* src, size_t n, int worker) override;
  void copy_to_host(void* dst, const void* src, size_t n, int worker) override;
  uint64_t record(int worker) override;
  void wait(int worker, uint64_t token) override;
  void stream_wait(int worker, uint64_t token, uintptr_t stream) override;
  void synchronize() override;
  void drain(int worker) noexcept override;
  // Page-locked buffers made by faulting in ordinary memory (huge pages where possible) in the
  // calling thread and registering it with the driver (portable: every GPU DMAs from it at full
  // speed). Several times faster to create than cuMemHostAlloc: registering resident pages takes
  // about 0.05 s per GiB, and the faulting runs in parallel over the calling threads.
  // The staging buffers of loads and the store server's pool.
  HostAllocator staging_allocator() const override;

 private:
  struct Worker {
    cuda::CUstream stream = nullptr;
    // Ring indexed by token % size. A slot re-recorded for a later token still answers for the
    // earlier one: the stream runs in order, so the later record completes after it.
    std::vector<cuda::CUevent> events;
    uint64_t next_token = 0;
  };

  const cuda::Driver* drv_;
  int ordinal_;
  cuda::CUdevice dev_ = 0;
  cuda::CUcontext ctx_ = nullptr;
  std::vector<Worker> workers_;
};

}  // namespace sllm
