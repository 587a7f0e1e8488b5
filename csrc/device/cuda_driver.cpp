#include "device/cuda_driver.h"

#include <dlfcn.h>

#include <string>
#include <mutex>

#include "common/errors.h"

namespace sllm {
namespace cuda {

namespace {

struct Loaded {
  Driver table{};
  bool ok = false;
  std::string reason;
};

template <class F>
bool bind(void* lib, const char* name, F& slot, std::string& reason) {
  void* sym = ::dlsym(lib, name);
  if (sym == nullptr) {
    reason = std::string("libcuda.so.1 lacks ") + name;
    return false;
  }
  slot = reinterpret_cast<F>(sym);
  return true;
}

// Binds an entry that older drivers may lack: left nullptr if absent.
template <class F>
void bind_optional(void* lib, const char* name, F& slot) {
  slot = reinterpret_cast<F>(::dlsym(lib, name));
}

// The driver library to load (set_library), guarded by its mutex; read once, by the first load().
std::mutex library_mutex;
std::string library_path;  // "" = libcuda.so.1
bool library_used = false;

Loaded load() {
  Loaded l;
  std::string chosen;
  {
    std::lock_guard<std::mutex> lock(library_mutex);
    library_used = true;
    chosen = library_path.empty() ? "libcuda.so.1" : library_path;
  }
  const char* path = chosen.c_str();
  // The handle is never closed: the driver stays loaded for the life of the process, as it does
  // for PyTorch in the same process.
  void* lib = ::dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (lib == nullptr) {
    const char* e = ::dlerror();
    l.reason = std::string("CUDA driver not found (") + (e ? e : path) + ")";
    return l;
  }
  Driver& d = l.table;
  std::string& r = l.reason;
  bool ok = bind(lib, "cuInit", d.cuInit, r) && bind(lib, "cuDeviceGetCount", d.cuDeviceGetCount, r) &&
            bind(lib, "cuDeviceGet", d.cuDeviceGet, r) &&
            bind(lib, "cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain, r) &&
            bind(lib, "cuDevicePrimaryCtxRelease_v2", d.cuDevicePrimaryCtxRelease, r) &&
            bind(lib, "cuCtxSetCurrent", d.cuCtxSetCurrent, r) &&
            bind(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent, r) &&
            bind(lib, "cuStreamCreate", d.cuStreamCreate, r) &&
            bind(lib, "cuStreamDestroy_v2", d.cuStreamDestroy, r) &&
            bind(lib, "cuStreamSynchronize", d.cuStreamSynchronize, r) &&
            bind(lib, "cuEventCreate", d.cuEventCreate, r) &&
            bind(lib, "cuEventDestroy_v2", d.cuEventDestroy, r) &&
            bind(lib, "cuEventRecord", d.cuEventRecord, r) &&
            bind(lib, "cuEventSynchronize", d.cuEventSynchronize, r) &&
            bind(lib, "cuStreamWaitEvent", d.cuStreamWaitEvent, r) &&
            bind(lib, "cuMemcpyHtoDAsync_v2", d.cuMemcpyHtoDAsync, r) &&
            bind(lib, "cuMemcpyDtoHAsync_v2", d.cuMemcpyDtoHAsync, r) &&
            bind(lib, "cuGetErrorString", d.cuGetErrorString, r) &&
            bind(lib, "cuIpcGetMemHandle", d.cuIpcGetMemHandle, r) &&
            (bind(lib, "cuIpcOpenMemHandle_v2", d.cuIpcOpenMemHandle, r) ||
             bind(lib, "cuIpcOpenMemHandle", d.cuIpcOpenMemHandle, r)) &&
            bind(lib, "cuIpcCloseMemHandle", d.cuIpcCloseMemHandle, r) &&
            bind(lib, "cuMemGetAddressRange_v2", d.cuMemGetAddressRange, r) &&
            bind(lib, "cuPointerGetAttribute", d.cuPointerGetAttribute, r) &&
            bind(lib, "cuDeviceGetPCIBusId", d.cuDeviceGetPCIBusId, r) &&
            bind(lib, "cuDeviceGetByPCIBusId", d.cuDeviceGetByPCIBusId, r) &&
            bind(lib, "cuMemHostRegister_v2", d.cuMemHostRegister, r) &&
            bind(lib, "cuMemHostUnregister", d.cuMemHostUnregister, r);
  if (!ok) return l;
  bind_optional(lib, "cuMemCreate", d.cuMemCreate);
  bind_optional(lib, "cuMemRelease", d.cuMemRelease);
  bind_optional(lib, "cuMemAddressReserve", d.cuMemAddressReserve);
  bind_optional(lib, "cuMemAddressFree", d.cuMemAddressFree);
  bind_optional(lib, "cuMemMap", d.cuMemMap);
  bind_optional(lib, "cuMemUnmap", d.cuMemUnmap);
  bind_optional(lib, "cuMemSetAccess", d.cuMemSetAccess);
  bind_optional(lib, "cuMemGetAllocationGranularity", d.cuMemGetAllocationGranularity);
  bind_optional(lib, "cuMemExportToShareableHandle", d.cuMemExportToShareableHandle);
  bind_optional(lib, "cuMemImportFromShareableHandle", d.cuMemImportFromShareableHandle);
  bind_optional(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute);
  bind_optional(lib, "cuMemcpyDtoDAsync_v2", d.cuMemcpyDtoDAsync);
  bind_optional(lib, "cuMemGetInfo_v2", d.cuMemGetInfo);
  CUresult res = d.cuInit(0);
  if (res != CUDA_SUCCESS) {
    const char* s = nullptr;
    d.cuGetErrorString(res, &s);
    l.reason = std::string("cuInit failed: ") + (s ? s : std::to_string(res));
    return l;
  }
  l.reason.clear();  // a fallback symbol may have been tried first
  l.ok = true;
  return l;
}

const Loaded& loaded() {
  static Loaded l = load();
  return l;
}

}  // namespace

bool set_library(const std::string& path) {
  std::lock_guard<std::mutex> lock(library_mutex);
  if (library_used) return path == library_path;
  library_path = path;
  return true;
}

const Driver* driver() { return loaded().ok ? &loaded().table : nullptr; }

std::string unavailable_reason() { return loaded().reason; }

int device_count() {
  const Driver* d = driver();
  int n = 0;
  if (d == nullptr || d->cuDeviceGetCount(&n) != CUDA_SUCCESS) return 0;
  return n;
}

void check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const char* s = nullptr;
  if (const Driver* d = driver()) d->cuGetErrorString(r, &s);
  // 2 = CUDA_ERROR_OUT_OF_MEMORY
  throw Error(r == 2 ? ErrorKind::kOutOfMemory : ErrorKind::kDevice,
              std::string(what) + " failed: " + (s ? s : ("CUDA error " + std::to_string(r))));
}

PrimaryContextRef::PrimaryContextRef(const Driver* d, CUdevice dev) : d_(d), dev_(dev) {
  check(d_->cuDevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
}

PrimaryContextRef::~PrimaryContextRef() { d_->cuDevicePrimaryCtxRelease(dev_); }

ScopedContext::ScopedContext(const Driver* d, CUcontext ctx) : d_(d) {
  if (d_->cuCtxGetCurrent(&previous_) != CUDA_SUCCESS) previous_ = nullptr;
  if (previous_ == ctx) return;
  check(d_->cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
  changed_ = true;
}

ScopedContext::~ScopedContext() {
  if (changed_) d_->cuCtxSetCurrent(previous_);  // best effort: never throw from a destructor
}

}  // namespace cuda
}  // namespace sllm
