#include "device/cuda_device.h"

#include <sys/mman.h>

#include <string>

#include "common/errors.h"

namespace sllm {

namespace {
constexpr size_t kEventsPerWorker = 8;  // > buffers in flight per worker

// A copy thread waiting for its copy sleeps until the copy is done (CU_EVENT_BLOCKING_SYNC)
// instead of spinning on a core that the reads, GETs and checksums need.
constexpr unsigned kEventFlags = cuda::CU_EVENT_DISABLE_TIMING | cuda::CU_EVENT_BLOCKING_SYNC;
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
  drv_->cuCtxSetCurrent(ctx_);
  for (auto& w : workers_) {
    for (auto e : w.events) drv_->cuEventDestroy(e);
    if (w.stream) drv_->cuStreamDestroy(w.stream);
  }
  drv_->cuDevicePrimaryCtxRelease(dev_);
}

void CudaDevice::make_current() const {
  cuda::CUcontext cur = nullptr;
  drv_->cuCtxGetCurrent(&cur);
  if (cur != ctx_) cuda::check(drv_->cuCtxSetCurrent(ctx_), "cuCtxSetCurrent");
}

void CudaDevice::begin(int num_workers) {
  const unsigned flags = kEventFlags;
  make_current();
  workers_.resize(static_cast<size_t>(num_workers));
  for (auto& w : workers_) {
    if (w.stream == nullptr)
      cuda::check(drv_->cuStreamCreate(&w.stream, cuda::CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    while (w.events.size() < kEventsPerWorker) {
      cuda::CUevent e = nullptr;
      cuda::check(drv_->cuEventCreate(&e, flags), "cuEventCreate");
      w.events.push_back(e);
    }
  }
}

void CudaDevice::copy_from_host(void* dst, const void* src, size_t n, int worker) {
  make_current();
  cuda::check(drv_->cuMemcpyHtoDAsync(reinterpret_cast<cuda::CUdeviceptr>(dst), src, n,
                                      workers_.at(worker).stream),
              "cuMemcpyHtoDAsync");
}

void CudaDevice::copy_to_host(void* dst, const void* src, size_t n, int worker) {
  make_current();
  cuda::check(drv_->cuMemcpyDtoHAsync(dst, reinterpret_cast<cuda::CUdeviceptr>(src), n,
                                      workers_.at(worker).stream),
              "cuMemcpyDtoHAsync");
}

uint64_t CudaDevice::record(int worker) {
  make_current();
  Worker& w = workers_.at(worker);
  uint64_t token = w.next_token++;
  cuda::check(drv_->cuEventRecord(w.events[token % w.events.size()], w.stream), "cuEventRecord");
  return token;
}

void CudaDevice::wait(int worker, uint64_t token) {
  Worker& w = workers_.at(worker);
  if (token + w.events.size() < w.next_token) return;  // long done: its event was reused
  make_current();
  cuda::check(drv_->cuEventSynchronize(w.events[token % w.events.size()]), "cuEventSynchronize");
}

void CudaDevice::synchronize() {
  make_current();
  for (auto& w : workers_)
    if (w.stream) cuda::check(drv_->cuStreamSynchronize(w.stream), "cuStreamSynchronize");
}

HostAllocator CudaDevice::staging_allocator() const {
  const cuda::Driver* drv = drv_;
  cuda::CUcontext ctx = ctx_;
  return [drv, ctx](size_t size) {
    drv->cuCtxSetCurrent(ctx);
    void* p = nullptr;
    cuda::check(drv->cuMemHostAlloc(&p, size, cuda::CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc");
    return HostBuffer(p, size, [drv](void* q) { drv->cuMemFreeHost(q); });
  };
}

}  // namespace sllm

namespace sllm {

HostAllocator CudaDevice::registered_allocator() const {
  const cuda::Driver* drv = drv_;
  cuda::CUcontext ctx = ctx_;
  return [drv, ctx](size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw Error(ErrorKind::kOutOfMemory, "cannot map " + std::to_string(size) + " bytes of host memory");
#ifdef MADV_HUGEPAGE
    ::madvise(p, size, MADV_HUGEPAGE);  // advisory: fewer faults and page-table entries to pin
#endif
    char* c = static_cast<char*>(p);
    for (size_t o = 0; o < size; o += 4096) c[o] = 0;
    drv->cuCtxSetCurrent(ctx);
    cuda::CUresult r = drv->cuMemHostRegister(p, size, cuda::CU_MEMHOSTREGISTER_PORTABLE);
    if (r != cuda::CUDA_SUCCESS) {
      ::munmap(p, size);
      cuda::check(r, "cuMemHostRegister");
    }
    return HostBuffer(p, size, [drv, ctx, size](void* q) {
      drv->cuCtxSetCurrent(ctx);
      drv->cuMemHostUnregister(q);
      ::munmap(q, size);
    });
  };
}

}  // namespace sllm
