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
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x1;
constexpr unsigned CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1;
constexpr int CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9;
constexpr size_t CU_IPC_HANDLE_SIZE = 64;

struct CUipcMemHandle {
  char reserved[CU_IPC_HANDLE_SIZE];
};

// Virtual memory management (cuMemCreate and friends), laid out as cuda.h lays them out (CUDA 11.2
// and later; the enums are int-sized).
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_SUPPORTED = 801;
constexpr int CU_MEM_ALLOCATION_TYPE_PINNED = 1;
constexpr int CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1;
constexpr int CU_MEM_LOCATION_TYPE_DEVICE = 1;
constexpr int CU_MEM_ACCESS_FLAGS_PROT_READ = 1;
constexpr int CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3;
constexpr int CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0;
constexpr int CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102;
constexpr int CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103;

using CUmemGenericAllocationHandle = unsigned long long;

struct CUmemLocation {
  int type;  // CUmemLocationType
  int id;
};

struct CUmemAllocationProp {
  int type;                  // CUmemAllocationType
  int requestedHandleTypes;  // CUmemAllocationHandleType
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};
static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp must match cuda.h");

struct CUmemAccessDesc {
  CUmemLocation location;
  int flags;  // CUmemAccess_flags
};
static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc must match cuda.h");

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
  CUresult (*cuStreamWaitEvent)(CUstream, CUevent, unsigned);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
  CUresult (*cuMemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream);
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

  // Optional: nullptr when the driver lacks them (loading does not fail). Virtual memory
  // management with shareable handles, device-to-device copies and the device's free memory.
  CUresult (*cuMemCreate)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long);
  CUresult (*cuMemRelease)(CUmemGenericAllocationHandle);
  CUresult (*cuMemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
  CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
  CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
  CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  CUresult (*cuMemGetAllocationGranularity)(size_t*, const CUmemAllocationProp*, int);
  CUresult (*cuMemExportToShareableHandle)(void*, CUmemGenericAllocationHandle, int, unsigned long long);
  CUresult (*cuMemImportFromShareableHandle)(CUmemGenericAllocationHandle*, void*, int);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuMemcpyDtoDAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
  CUresult (*cuMemGetInfo)(size_t*, size_t*);
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
