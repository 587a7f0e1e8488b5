// The CUDA driver API, loaded at run time with dlopen("libcuda.so.1").
//
// Nothing here needs CUDA headers or a toolkit at build time: the few types and entry points the
// loader uses are declared locally (they are part of the driver's stable ABI). If the library or
// a GPU is missing, available() is false and why() says why; the CPU path is unaffected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace sllm {
namespace cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned CU_EVENT_BLOCKING_SYNC = 0x1;
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned CU_MEMHOSTALLOC_PORTABLE = 0x1;
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x1;
constexpr unsigned CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1;
constexpr int CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9;
constexpr size_t CU_IPC_HANDLE_SIZE = 64;

struct CUipcMemHandle {
  char reserved[CU_IPC_HANDLE_SIZE];
};

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuStreamCreate)(CUstream*, unsigned);
  CUresult (*cuStreamDestroy)(CUstream);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuEventCreate)(CUevent*, unsigned);
  CUresult (*cuEventDestroy)(CUevent);
  CUresult (*cuEventRecord)(CUevent, CUstream);
  CUresult (*cuEventSynchronize)(CUevent);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
  CUresult (*cuMemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream);
  CUresult (*cuMemHostAlloc)(void**, size_t, unsigned);
  CUresult (*cuMemFreeHost)(void*);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  // Inter-process memory sharing (the store server copies into a client's GPU memory).
  CUresult (*cuIpcGetMemHandle)(CUipcMemHandle*, CUdeviceptr);
  CUresult (*cuIpcOpenMemHandle)(CUdeviceptr*, CUipcMemHandle, unsigned);
  CUresult (*cuIpcCloseMemHandle)(CUdeviceptr);
  CUresult (*cuMemGetAddressRange)(CUdeviceptr*, size_t*, CUdeviceptr);
  CUresult (*cuPointerGetAttribute)(void*, int, CUdeviceptr);
  CUresult (*cuDeviceGetPCIBusId)(char*, int, CUdevice);
  CUresult (*cuDeviceGetByPCIBusId)(CUdevice*, const char*);
  CUresult (*cuMemHostRegister)(void*, size_t, unsigned);
  CUresult (*cuMemHostUnregister)(void*);
};

// The process-wide driver table, loaded and cuInit'ed on first use; nullptr if unavailable.
const Driver* driver();
// The driver library that driver() loads on first use: a path, or "" for libcuda.so.1 (the tests
// use a CPU stand-in, tests/fake_cuda.cpp, to run the GPU pipeline without a GPU). Takes effect
// only before the first use; returns whether `path` is (or will be) the one loaded.
bool set_library(const std::string& path);
// Why driver() is nullptr ("" when it is not).
std::string unavailable_reason();
// Number of visible CUDA devices (0 without a driver).
int device_count();

// Throws sllm::Error(kDevice) naming `what` unless r is CUDA_SUCCESS.
void check(CUresult r, const char* what);

// A reference on a device's primary context, released when destroyed: what keeps the context (and
// the page-locked memory made under it) alive.
class PrimaryContextRef {
 public:
  PrimaryContextRef(const Driver* d, CUdevice dev);
  ~PrimaryContextRef();
  PrimaryContextRef(const PrimaryContextRef&) = delete;
  PrimaryContextRef& operator=(const PrimaryContextRef&) = delete;
  CUcontext get() const { return ctx_; }

 private:
  const Driver* d_;
  CUdevice dev_;
  CUcontext ctx_ = nullptr;
};

// Makes `ctx` the calling thread's current context for the scope and puts back the one that was
// current before (another device's, or none), so that no entry point changes the context of a
// caller's thread (PyTorch's work on "cuda" follows it). Throws sllm::Error(kDevice) if `ctx`
// cannot be made current.
class ScopedContext {
 public:
  ScopedContext(const Driver* d, CUcontext ctx);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

 private:
  const Driver* d_;
  CUcontext previous_ = nullptr;
  bool changed_ = false;
};

}  // namespace cuda
}  // namespace sllm
