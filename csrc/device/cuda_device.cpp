#include "device/cuda_device.h"

#include <sys/mman.h>

#include <cstdio>
#include <string>

#include "common/errors.h"

namespace sllm {

namespace {
constexpr size_t kEventsPerWorker = 8;  // waits on older tokens wait on a later record instead

// A copy thread waiting for its copy sleeps until the copy is done (CU_EVENT_BLOCKING_SYNC)
// instead of spinning on a core that the reads, GETs and checksums need.
constexpr unsigned kEventFlags = cuda::CU_EVENT_DISABLE_TIMING | cuda::CU_EVENT_BLOCKING_SYNC;

// Unregisters page-locked memory under its context; a failure can only be reported, not thrown.
void free_pinned(const cuda::Driver* d, const cuda::PrimaryContextRef& ctx, void* p) {
  cuda::CUresult r = cuda::CUDA_SUCCESS;
  try {
    cuda::ScopedContext scope(d, ctx.get());
    r = d->cuMemHostUnregister(p);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sllm-store: cannot free page-locked memory: %s\n", e.what());
    return;
  }
  if (r != cuda::CUDA_SUCCESS) {
    const char* s = nullptr;
    d->cuGetErrorString(r, &s);
    std::fprintf(stderr, "sllm-store: cuMemHostUnregister failed: %s\n", s ? s : std::to_string(r).c_str());
  }
}
}  // namespace

CudaDevice::CudaDevice(int ordinal) : drv_(cuda::driver()), ordinal_(ordinal) {
  if (drv_ == nullptr)
    throw Error(ErrorKind::kDevice, "cannot use cuda:" + std::to_string(ordinal) + ": " +
                                        cuda::unavailable_reason());
  int count = cuda::device_count();
  if (ordinal < 0 || ordinal >= count)
    throw Error(ErrorKind::kDevice, "cuda:" + std::to_string(ordinal) + " does not exist (" +
                                        std::to_string(count) + " CUDA device(s) visible)");
  cuda::check(drv_->cuDeviceGet(&dev_, ordinal), "cuDeviceGet");
  cuda::check(drv_->cuDevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
}

CudaDevice::~CudaDevice() {
  // Best effort: never throw from a destructor.
  try {
    cuda::ScopedContext scope(drv_, ctx_);
    for (auto& w : workers_) {
      if (w.stream) drv_->cuStreamSynchronize(w.stream);  // copies still queued finish first
      for (auto e : w.events) drv_->cuEventDestroy(e);
      if (w.stream) drv_->cuStreamDestroy(w.stream);
    }
  } catch (...) {
  }
  drv_->cuDevicePrimaryCtxRelease(dev_);
}

void CudaDevice::begin(int num_workers) {
  cuda::ScopedContext scope(drv_, ctx_);
  workers_.resize(static_cast<size_t>(num_workers));
  for (auto& w : workers_) {
    if (w.stream == nullptr)
      cuda::check(drv_->cuStreamCreate(&w.stream, cuda::CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    while (w.events.size() < kEventsPerWorker) {
      cuda::CUevent e = nullptr;
      cuda::check(drv_->cuEventCreate(&e, kEventFlags), "cuEventCreate");
      w.events.push_back(e);
    }
  }
}

void CudaDevice::copy_from_host(void* dst, const void* src, size_t n, int worker) {
  cuda::ScopedContext scope(drv_, ctx_);
  cuda::check(drv_->cuMemcpyHtoDAsync(reinterpret_cast<cuda::CUdeviceptr>(dst), src, n,
                                      workers_.at(worker).stream),
              "cuMemcpyHtoDAsync");
}

void CudaDevice::copy_to_host(void* dst, const void* src, size_t n, int worker) {
  cuda::ScopedContext scope(drv_, ctx_);
  cuda::check(drv_->cuMemcpyDtoHAsync(dst, reinterpret_cast<cuda::CUdeviceptr>(src), n,
                                      workers_.at(worker).stream),
              "cuMemcpyDtoHAsync");
}

uint64_t CudaDevice::record(int worker) {
  cuda::ScopedContext scope(drv_, ctx_);
  Worker& w = workers_.at(worker);
  uint64_t token = w.next_token++;
  cuda::check(drv_->cuEventRecord(w.events[token % w.events.size()], w.stream), "cuEventRecord");
  return token;
}

void CudaDevice::wait(int worker, uint64_t token) {
  Worker& w = workers_.at(worker);
  if (token >= w.next_token) throw Error(ErrorKind::kDevice, "wait on a token never recorded");
  cuda::ScopedContext scope(drv_, ctx_);
  // The slot holds this token's record or a later one of the same stream: either way, once it
  // completes, so have the copies before `token`.
  cuda::check(drv_->cuEventSynchronize(w.events[token % w.events.size()]), "cuEventSynchronize");
}

void CudaDevice::stream_wait(int worker, uint64_t token, uintptr_t stream) {
  // Another thread than the worker's: only the events, fixed since begin(), are read here.
  const Worker& w = workers_.at(worker);
  cuda::ScopedContext scope(drv_, ctx_);
  // As in wait(): the slot holds this token's record or a later one of the same stream.
  cuda::check(drv_->cuStreamWaitEvent(reinterpret_cast<cuda::CUstream>(stream), w.events[token % w.events.size()], 0),
              "cuStreamWaitEvent");
}

void CudaDevice::synchronize() {
  cuda::ScopedContext scope(drv_, ctx_);
  for (auto& w : workers_)
    if (w.stream) cuda::check(drv_->cuStreamSynchronize(w.stream), "cuStreamSynchronize");
}

void CudaDevice::drain(int worker) noexcept {
  if (worker < 0 || static_cast<size_t>(worker) >= workers_.size() || !workers_[worker].stream) return;
  try {
    cuda::ScopedContext scope(drv_, ctx_);
    drv_->cuStreamSynchronize(workers_[worker].stream);  // its error is the load's error already
  } catch (...) {
  }
}

HostAllocator CudaDevice::staging_allocator() const {
  const cuda::Driver* drv = drv_;
  cuda::CUdevice dev = dev_;
  return [drv, dev](size_t size) {
    auto ctx = std::make_shared<cuda::PrimaryContextRef>(drv, dev);  // held by the buffer
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw Error(ErrorKind::kOutOfMemory, "cannot map " + std::to_string(size) + " bytes of host memory");
#ifdef MADV_HUGEPAGE
    ::madvise(p, size, MADV_HUGEPAGE);  // advisory: fewer faults and page-table entries to pin
#endif
    char* c = static_cast<char*>(p);
    for (size_t o = 0; o < size; o += 4096) c[o] = 0;
    cuda::CUresult r;
    {
      cuda::ScopedContext scope(drv, ctx->get());
      r = drv->cuMemHostRegister(p, size, cuda::CU_MEMHOSTREGISTER_PORTABLE);
    }
    if (r != cuda::CUDA_SUCCESS) {
      ::munmap(p, size);
      cuda::check(r, "cuMemHostRegister");
    }
    return HostBuffer(p, size, [drv, ctx, size](void* q) {
      free_pinned(drv, *ctx, q);
      ::munmap(q, size);
    });
  };
}

}  // namespace sllm
