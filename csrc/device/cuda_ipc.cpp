#include "device/cuda_ipc.h"

#include <cstring>

#include "common/errors.h"

namespace sllm {

namespace {

const cuda::Driver* need_driver(const char* what) {
  const cuda::Driver* d = cuda::driver();
  if (d == nullptr) throw Error(ErrorKind::kDevice, std::string(what) + ": " + cuda::unavailable_reason());
  return d;
}

// A reference on `dev`'s primary context for the scope, made current on this thread for the
// scope (the thread's previous context is put back after).
class PrimaryContext {
 public:
  PrimaryContext(const cuda::Driver* d, cuda::CUdevice dev) : ref_(d, dev), scope_(d, ref_.get()) {}
  cuda::CUcontext get() const { return ref_.get(); }

 private:
  cuda::PrimaryContextRef ref_;  // declared first: released after the scope ends
  cuda::ScopedContext scope_;
};

std::string bus_id(const cuda::Driver* d, cuda::CUdevice dev) {
  char buf[32] = {0};
  cuda::check(d->cuDeviceGetPCIBusId(buf, sizeof buf, dev), "cuDeviceGetPCIBusId");
  return buf;
}

}  // namespace

IpcExport ipc_export(uint64_t ptr) {
  const cuda::Driver* d = need_driver("cannot export GPU memory");
  int ordinal = -1;
  cuda::check(d->cuPointerGetAttribute(&ordinal, cuda::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr),
              "cuPointerGetAttribute (is the pointer GPU memory?)");
  cuda::CUdevice dev = 0;
  cuda::check(d->cuDeviceGet(&dev, ordinal), "cuDeviceGet");
  PrimaryContext ctx(d, dev);
  cuda::CUdeviceptr base = 0;
  size_t size = 0;
  cuda::check(d->cuMemGetAddressRange(&base, &size, ptr), "cuMemGetAddressRange");
  cuda::CUipcMemHandle h{};
  cuda::CUresult r = d->cuIpcGetMemHandle(&h, base);
  if (r != cuda::CUDA_SUCCESS) {
    const char* s = nullptr;
    d->cuGetErrorString(r, &s);
    throw Error(ErrorKind::kDevice,
                std::string("cannot share this GPU memory with the store server (cuIpcGetMemHandle: ") +
                    (s ? s : std::to_string(r)) +
                    "); allocations from expandable segments (PYTORCH_CUDA_ALLOC_CONF="
                    "expandable_segments:True) cannot be shared");
  }
  IpcExport out;
  out.handle.assign(h.reserved, sizeof h.reserved);
  out.offset = ptr - base;
  out.alloc_size = size;
  out.pci_bus_id = bus_id(d, dev);
  return out;
}

IpcMapping::IpcMapping(const std::string& pci_bus_id, const std::string& handle)
    : drv_(need_driver("cannot import GPU memory")) {
  if (handle.size() != cuda::CU_IPC_HANDLE_SIZE)
    throw Error(ErrorKind::kFormat, "a CUDA IPC handle has " + std::to_string(cuda::CU_IPC_HANDLE_SIZE) +
                                        " bytes, got " + std::to_string(handle.size()));
  if (drv_->cuDeviceGetByPCIBusId(&dev_, pci_bus_id.c_str()) != cuda::CUDA_SUCCESS)
    throw Error(ErrorKind::kDevice, "GPU " + pci_bus_id + " is not visible to this process "
                                    "(check CUDA_VISIBLE_DEVICES of the store server)");
  ordinal_ = static_cast<int>(dev_);
  cuda::check(drv_->cuDevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
  try {
    cuda::CUipcMemHandle h{};
    std::memcpy(h.reserved, handle.data(), sizeof h.reserved);
    cuda::ScopedContext scope(drv_, ctx_);
    cuda::check(drv_->cuIpcOpenMemHandle(&base_, h, cuda::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                "cuIpcOpenMemHandle");
    // The size of what the handle maps bounds every copy into it. A mapping whose size the driver
    // cannot tell is refused: a copy past its end would leave a sticky error in this process's
    // context and break every later load.
    cuda::CUdeviceptr start = 0;
    size_t size = 0;
    if (drv_->cuMemGetAddressRange(&start, &size, base_) != cuda::CUDA_SUCCESS || start != base_ || size == 0)
      throw Error(ErrorKind::kDevice, "cannot tell the size of the client's GPU memory (cuMemGetAddressRange)");
    size_ = size;
  } catch (...) {
    close();
    throw;
  }
}

void IpcMapping::close() {
  if (base_ != 0) {
    try {
      cuda::ScopedContext scope(drv_, ctx_);
      drv_->cuIpcCloseMemHandle(base_);
    } catch (...) {  // the context is gone: so is the mapping
    }
    base_ = 0;
  }
  if (ctx_ != nullptr) {
    drv_->cuDevicePrimaryCtxRelease(dev_);
    ctx_ = nullptr;
  }
}

IpcMapping::~IpcMapping() { close(); }

}  // namespace sllm
