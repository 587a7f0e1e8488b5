// CUDA inter-process memory: a client exports the device allocation it wants filled, the store
// server imports it and copies into it from its pinned cache.
//
// Devices are named by PCI bus id, not ordinal: client and server may see different
// CUDA_VISIBLE_DEVICES orderings.
#pragma once

#include <cstdint>
#include <string>

#include "device/cuda_driver.h"

namespace sllm {

struct IpcExport {
  std::string handle;      // CU_IPC_HANDLE_SIZE opaque bytes
  uint64_t offset = 0;     // of the exported pointer from the start of its allocation
  uint64_t alloc_size = 0; // size of the whole allocation the handle covers
  std::string pci_bus_id;  // e.g. "0000:17:00.0"
};

// Exports the allocation that holds device pointer `ptr` (made by this process, e.g. PyTorch's
// caching allocator). Throws sllm::Error(kDevice) if it is not shareable (e.g. expandable or
// virtual-memory segments).
IpcExport ipc_export(uint64_t ptr);

// An imported allocation, open for as long as the object lives.
class IpcMapping {
 public:
  IpcMapping(const std::string& pci_bus_id, const std::string& handle);
  ~IpcMapping();
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;

  uint64_t base() const { return base_; }
  uint64_t size() const { return size_; }  // bytes mapped from base()
  int ordinal() const { return ordinal_; }  // in this process's numbering
  void close();

 private:
  const cuda::Driver* drv_;
  int ordinal_ = -1;
  cuda::CUdevice dev_ = 0;
  cuda::CUcontext ctx_ = nullptr;
  cuda::CUdeviceptr base_ = 0;
  uint64_t size_ = 0;
};

}  // namespace sllm
