#include "device/cuda_vmm.h"

#include <cstdio>
#include <limits>

#include "common/errors.h"

namespace sllm {

namespace {

std::string device_name(int ordinal) { return "cuda:" + std::to_string(ordinal); }

std::string error_string(const cuda::Driver* d, cuda::CUresult r) {
  const char* s = nullptr;
  d->cuGetErrorString(r, &s);
  return s ? s : "CUDA error " + std::to_string(r);
}

// Throws sllm::Error(kDevice) naming `what` unless r is CUDA_SUCCESS.
void check(const cuda::Driver* d, cuda::CUresult r, const char* what) {
  if (r != cuda::CUDA_SUCCESS) throw Error(ErrorKind::kDevice, std::string(what) + " failed: " + error_string(d, r));
}

// Reports a failure where nothing can be thrown (closing).
void report(const cuda::Driver* d, cuda::CUresult r, const char* what) {
  if (r != cuda::CUDA_SUCCESS) std::fprintf(stderr, "sllm-store: %s failed: %s\n", what, error_string(d, r).c_str());
}

const cuda::Driver* need_driver(const std::string& what) {
  const cuda::Driver* d = cuda::driver();
  if (d == nullptr) throw Error(ErrorKind::kDevice, what + ": " + cuda::unavailable_reason());
  return d;
}

// The device of `ordinal`, which must exist.
cuda::CUdevice device_of(const cuda::Driver* d, int ordinal) {
  int count = cuda::device_count();
  if (ordinal < 0 || ordinal >= count)
    throw Error(ErrorKind::kDevice, device_name(ordinal) + " does not exist (" + std::to_string(count) +
                                        " CUDA device(s) visible)");
  cuda::CUdevice dev = 0;
  check(d, d->cuDeviceGet(&dev, ordinal), "cuDeviceGet");
  return dev;
}

// The names of the virtual memory entry points that the driver lacks ("" when none).
std::string missing_entries(const cuda::Driver* d) {
  std::string missing;
  auto need = [&missing](const void* entry, const char* name) {
    if (entry != nullptr) return;
    if (!missing.empty()) missing += ", ";
    missing += name;
  };
  need(reinterpret_cast<const void*>(d->cuMemCreate), "cuMemCreate");
  need(reinterpret_cast<const void*>(d->cuMemRelease), "cuMemRelease");
  need(reinterpret_cast<const void*>(d->cuMemAddressReserve), "cuMemAddressReserve");
  need(reinterpret_cast<const void*>(d->cuMemAddressFree), "cuMemAddressFree");
  need(reinterpret_cast<const void*>(d->cuMemMap), "cuMemMap");
  need(reinterpret_cast<const void*>(d->cuMemUnmap), "cuMemUnmap");
  need(reinterpret_cast<const void*>(d->cuMemSetAccess), "cuMemSetAccess");
  need(reinterpret_cast<const void*>(d->cuMemGetAllocationGranularity), "cuMemGetAllocationGranularity");
  need(reinterpret_cast<const void*>(d->cuMemExportToShareableHandle), "cuMemExportToShareableHandle");
  need(reinterpret_cast<const void*>(d->cuMemImportFromShareableHandle), "cuMemImportFromShareableHandle");
  need(reinterpret_cast<const void*>(d->cuDeviceGetAttribute), "cuDeviceGetAttribute");
  return missing;
}

// Throws sllm::Error(kDevice) unless the driver has every virtual memory entry point.
void need_vmm_entries(const cuda::Driver* d, const std::string& what) {
  std::string missing = missing_entries(d);
  if (!missing.empty())
    throw Error(ErrorKind::kDevice, what + ": the CUDA driver lacks " + missing + " (too old for shareable GPU memory)");
}

// Pinned device memory on `dev`, exportable as a POSIX file descriptor.
cuda::CUmemAllocationProp allocation_prop(cuda::CUdevice dev) {
  cuda::CUmemAllocationProp prop{};
  prop.type = cuda::CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = cuda::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  prop.location.type = cuda::CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = dev;
  return prop;
}

uint64_t granularity(const cuda::Driver* d, const cuda::CUmemAllocationProp& prop) {
  size_t g = 0;
  check(d, d->cuMemGetAllocationGranularity(&g, &prop, cuda::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity");
  if (g == 0) throw Error(ErrorKind::kDevice, "cuMemGetAllocationGranularity returned 0");
  return g;
}

cuda::CUmemAccessDesc access(cuda::CUdevice dev, int flags) {
  cuda::CUmemAccessDesc desc{};
  desc.location.type = cuda::CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = dev;
  desc.flags = flags;
  return desc;
}

std::string bus_id(const cuda::Driver* d, cuda::CUdevice dev) {
  char buf[32] = {0};
  check(d, d->cuDeviceGetPCIBusId(buf, sizeof buf, dev), "cuDeviceGetPCIBusId");
  return buf;
}

// The calling thread's current context is `ctx` while this lives, if it can be made so; closing
// goes on without it otherwise.
std::unique_ptr<cuda::ScopedContext> try_scope(const cuda::Driver* d, cuda::CUcontext ctx) noexcept {
  try {
    return std::make_unique<cuda::ScopedContext>(d, ctx);
  } catch (...) {
    return nullptr;
  }
}

// A stream of its own, destroyed with the object (under the context current at its creation).
class OwnStream {
 public:
  explicit OwnStream(const cuda::Driver* d) : d_(d) {
    check(d_, d_->cuStreamCreate(&s_, cuda::CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  }
  ~OwnStream() { report(d_, d_->cuStreamDestroy(s_), "cuStreamDestroy"); }
  OwnStream(const OwnStream&) = delete;
  OwnStream& operator=(const OwnStream&) = delete;
  cuda::CUstream get() const { return s_; }

 private:
  const cuda::Driver* d_;
  cuda::CUstream s_ = nullptr;
};

}  // namespace

std::string vmm_unsupported(int ordinal) {
  const cuda::Driver* d = cuda::driver();
  if (d == nullptr) return "the CUDA driver is unavailable: " + cuda::unavailable_reason();
  int count = cuda::device_count();
  if (ordinal < 0 || ordinal >= count)
    return device_name(ordinal) + " does not exist (" + std::to_string(count) + " CUDA device(s) visible)";
  std::string missing = missing_entries(d);
  if (!missing.empty()) return "the CUDA driver lacks " + missing;
  cuda::CUdevice dev = 0;
  if (cuda::CUresult r = d->cuDeviceGet(&dev, ordinal)) return "cuDeviceGet failed: " + error_string(d, r);
  int vmm = 0, fd_handles = 0;
  if (cuda::CUresult r = d->cuDeviceGetAttribute(&vmm, cuda::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev))
    return "cuDeviceGetAttribute failed: " + error_string(d, r);
  if (vmm == 0) return device_name(ordinal) + " does not support virtual memory management";
  if (cuda::CUresult r =
          d->cuDeviceGetAttribute(&fd_handles, cuda::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev))
    return "cuDeviceGetAttribute failed: " + error_string(d, r);
  if (fd_handles == 0) return device_name(ordinal) + " cannot export GPU memory as POSIX file descriptors";
  return "";
}

VmmAllocation::VmmAllocation(int ordinal, uint64_t size)
    : drv_(need_driver("cannot allocate shareable GPU memory on " + device_name(ordinal))), ordinal_(ordinal) {
  const std::string what = "cannot allocate shareable GPU memory on " + device_name(ordinal);
  if (std::string why = vmm_unsupported(ordinal); !why.empty()) throw Error(ErrorKind::kDevice, what + ": " + why);
  if (size == 0) throw Error(ErrorKind::kDevice, what + ": the size is 0");
  cuda::CUdevice dev = device_of(drv_, ordinal);
  pci_bus_id_ = bus_id(drv_, dev);
  ctx_ = std::make_unique<cuda::PrimaryContextRef>(drv_, dev);
  try {
    cuda::ScopedContext scope(drv_, ctx_->get());
    const cuda::CUmemAllocationProp prop = allocation_prop(dev);
    const uint64_t g = granularity(drv_, prop);
    if (size > std::numeric_limits<uint64_t>::max() - g)
      throw Error(ErrorKind::kDevice, what + ": " + std::to_string(size) + " bytes is too large");
    size_ = (size + g - 1) / g * g;
    cuda::CUresult r = drv_->cuMemCreate(&handle_, size_, &prop, 0);
    if (r == cuda::CUDA_ERROR_OUT_OF_MEMORY) {
      std::string free_now;
      size_t free_bytes = 0, total = 0;
      if (drv_->cuMemGetInfo && drv_->cuMemGetInfo(&free_bytes, &total) == cuda::CUDA_SUCCESS)
        free_now = ", " + std::to_string(free_bytes) + " of " + std::to_string(total) + " bytes free";
      throw Error(ErrorKind::kOutOfMemory, "cannot allocate " + std::to_string(size_) + " bytes of GPU memory on " +
                                               device_name(ordinal) + " (cuMemCreate: " + error_string(drv_, r) +
                                               free_now + ")");
    }
    check(drv_, r, "cuMemCreate");
    created_ = true;
    check(drv_, drv_->cuMemAddressReserve(&address_, size_, 0, 0, 0), "cuMemAddressReserve");
    check(drv_, drv_->cuMemMap(address_, size_, 0, handle_, 0), "cuMemMap");
    mapped_ = true;
    const cuda::CUmemAccessDesc desc = access(dev, cuda::CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    check(drv_, drv_->cuMemSetAccess(address_, size_, &desc, 1), "cuMemSetAccess");
  } catch (...) {
    close();
    throw;
  }
}

// Undoes what a mapping holds, in order (unmap, free the range, release the handle), reporting
// failures without throwing; clears each flag as its step is done.
static void unmap_and_release(const cuda::Driver* d, cuda::CUcontext ctx, cuda::CUdeviceptr& address, uint64_t size,
                       bool& mapped, cuda::CUmemGenericAllocationHandle& handle, bool& held) noexcept {
  std::unique_ptr<cuda::ScopedContext> scope = try_scope(d, ctx);
  if (mapped) report(d, d->cuMemUnmap(address, size), "cuMemUnmap");
  mapped = false;
  if (address != 0) report(d, d->cuMemAddressFree(address, size), "cuMemAddressFree");
  address = 0;
  if (held) report(d, d->cuMemRelease(handle), "cuMemRelease");
  held = false;
  handle = 0;
}

VmmAllocation::~VmmAllocation() { close(); }

uint64_t VmmAllocation::address() const {
  if (!mapped_) throw Error(ErrorKind::kDevice, "the GPU allocation on " + device_name(ordinal_) + " is closed");
  return address_;
}

int VmmAllocation::export_fd() {
  if (!created_) throw Error(ErrorKind::kDevice, "the GPU allocation on " + device_name(ordinal_) + " is closed");
  cuda::ScopedContext scope(drv_, ctx_->get());
  int fd = -1;
  check(drv_,
        drv_->cuMemExportToShareableHandle(&fd, handle_, cuda::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
        "cuMemExportToShareableHandle");
  return fd;
}

void VmmAllocation::close() noexcept {
  if (!ctx_) return;
  unmap_and_release(drv_, ctx_->get(), address_, size_, mapped_, handle_, created_);
  ctx_.reset();
}

VmmMapping::VmmMapping(const std::string& pci_bus_id, int fd, uint64_t size, bool read_only)
    : drv_(need_driver("cannot import GPU memory")), size_(size), read_only_(read_only) {
  const std::string what = "cannot import GPU memory of " + pci_bus_id;
  need_vmm_entries(drv_, what);
  if (fd < 0) throw Error(ErrorKind::kDevice, what + ": invalid file descriptor " + std::to_string(fd));
  if (size == 0) throw Error(ErrorKind::kDevice, what + ": the size is 0");
  cuda::CUdevice dev = 0;
  if (drv_->cuDeviceGetByPCIBusId(&dev, pci_bus_id.c_str()) != cuda::CUDA_SUCCESS)
    throw Error(ErrorKind::kDevice, "GPU " + pci_bus_id + " is not visible to this process "
                                    "(check CUDA_VISIBLE_DEVICES of both processes)");
  ordinal_ = static_cast<int>(dev);
  ctx_ = std::make_unique<cuda::PrimaryContextRef>(drv_, dev);
  try {
    cuda::ScopedContext scope(drv_, ctx_->get());
    const uint64_t g = granularity(drv_, allocation_prop(dev));
    if (size % g != 0)
      throw Error(ErrorKind::kDevice, what + ": the size " + std::to_string(size) +
                                          " is not a multiple of the allocation granularity " + std::to_string(g) +
                                          " (give the exporter's allocation size)");
    check(drv_,
          drv_->cuMemImportFromShareableHandle(&handle_, reinterpret_cast<void*>(static_cast<intptr_t>(fd)),
                                               cuda::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
          "cuMemImportFromShareableHandle");
    imported_ = true;
    check(drv_, drv_->cuMemAddressReserve(&address_, size_, 0, 0, 0), "cuMemAddressReserve");
    check(drv_, drv_->cuMemMap(address_, size_, 0, handle_, 0), "cuMemMap");
    mapped_ = true;
    cuda::CUresult r = cuda::CUDA_ERROR_NOT_SUPPORTED;
    if (read_only_) {
      const cuda::CUmemAccessDesc desc = access(dev, cuda::CU_MEM_ACCESS_FLAGS_PROT_READ);
      r = drv_->cuMemSetAccess(address_, size_, &desc, 1);
      if (r != cuda::CUDA_SUCCESS && r != cuda::CUDA_ERROR_INVALID_VALUE && r != cuda::CUDA_ERROR_NOT_SUPPORTED)
        check(drv_, r, "cuMemSetAccess (read-only)");
    }
    if (r != cuda::CUDA_SUCCESS) {  // read-write asked for, or read-only refused
      read_only_ = false;
      const cuda::CUmemAccessDesc desc = access(dev, cuda::CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
      check(drv_, drv_->cuMemSetAccess(address_, size_, &desc, 1), "cuMemSetAccess");
    }
    // The mapping keeps the memory alive: the handle is not needed any more.
    imported_ = false;
    check(drv_, drv_->cuMemRelease(handle_), "cuMemRelease");
    handle_ = 0;
  } catch (...) {
    close();
    throw;
  }
}

VmmMapping::~VmmMapping() { close(); }

uint64_t VmmMapping::address() const {
  if (!mapped_) throw Error(ErrorKind::kDevice, "the GPU memory mapping on " + device_name(ordinal_) + " is closed");
  return address_;
}

void VmmMapping::close() noexcept {
  if (!ctx_) return;
  unmap_and_release(drv_, ctx_->get(), address_, size_, mapped_, handle_, imported_);
  ctx_.reset();
}

void copy_device_to_device(int ordinal, uint64_t dst, uint64_t src, uint64_t n) {
  const cuda::Driver* d = need_driver("cannot copy on " + device_name(ordinal));
  if (d->cuMemcpyDtoDAsync == nullptr)
    throw Error(ErrorKind::kDevice, "cannot copy on " + device_name(ordinal) + ": the CUDA driver lacks cuMemcpyDtoDAsync_v2");
  if (n == 0) return;
  cuda::PrimaryContextRef ctx(d, device_of(d, ordinal));
  cuda::ScopedContext scope(d, ctx.get());
  OwnStream stream(d);
  check(d, d->cuMemcpyDtoDAsync(dst, src, n, stream.get()), "cuMemcpyDtoDAsync");
  check(d, d->cuStreamSynchronize(stream.get()), "cuStreamSynchronize");
}

std::pair<uint64_t, uint64_t> device_memory_info(int ordinal) {
  const cuda::Driver* d = need_driver("cannot query the memory of " + device_name(ordinal));
  if (d->cuMemGetInfo == nullptr)
    throw Error(ErrorKind::kDevice,
                "cannot query the memory of " + device_name(ordinal) + ": the CUDA driver lacks cuMemGetInfo_v2");
  cuda::PrimaryContextRef ctx(d, device_of(d, ordinal));
  cuda::ScopedContext scope(d, ctx.get());
  size_t free_bytes = 0, total = 0;
  check(d, d->cuMemGetInfo(&free_bytes, &total), "cuMemGetInfo");
  return {free_bytes, total};
}

}  // namespace sllm
