// GPU memory shared between processes through CUDA's virtual memory management (cuMemCreate):
// one process allocates it and exports it as a POSIX file descriptor, another process, handed
// that descriptor (over a Unix socket), imports it and maps it, read-only where the driver allows.
//
// The owner names its device by ordinal ("cuda:N" in this process's numbering); an importer names
// it by PCI bus id, since the two processes may see different CUDA_VISIBLE_DEVICES orderings.
// Each failure is an sllm::Error naming the driver call: kOutOfMemory when cuMemCreate finds too
// little free memory, kDevice otherwise.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "device/cuda_driver.h"

namespace sllm {

// Why device `ordinal` cannot allocate shareable GPU memory ("" when it can): the driver lacks a
// virtual memory entry point, or the device supports neither virtual memory management nor
// POSIX file-descriptor handles.
std::string vmm_unsupported(int ordinal);

// Device memory of this process, mapped read-write at address() and exportable to others.
class VmmAllocation {
 public:
  // Allocates at least `size` bytes (rounded up to the allocation granularity) on device `ordinal`.
  VmmAllocation(int ordinal, uint64_t size);
  ~VmmAllocation();  // close()
  VmmAllocation(const VmmAllocation&) = delete;
  VmmAllocation& operator=(const VmmAllocation&) = delete;

  uint64_t address() const;  // throws sllm::Error(kDevice) once closed
  uint64_t size() const { return size_; }  // bytes, rounded up to the granularity
  int ordinal() const { return ordinal_; }
  const std::string& pci_bus_id() const { return pci_bus_id_; }

  // A new file descriptor for the memory, owned by the caller; another process imports it with
  // VmmMapping. Throws once closed.
  int export_fd();

  // Unmaps the memory, releases it and frees its address range; idempotent, never throws. The
  // caller makes sure that no copy into or out of it is still running. Mappings of it in other
  // processes keep the memory alive until they are closed.
  void close() noexcept;

 private:
  const cuda::Driver* drv_;
  int ordinal_;
  uint64_t size_ = 0;
  std::string pci_bus_id_;
  std::unique_ptr<cuda::PrimaryContextRef> ctx_;
  cuda::CUmemGenericAllocationHandle handle_ = 0;
  bool created_ = false;
  cuda::CUdeviceptr address_ = 0;  // the reserved range, mapped once mapped_
  bool mapped_ = false;
};

// Device memory of another process, imported from the file descriptor that process exported and
// mapped into this one until close().
class VmmMapping {
 public:
  // Maps `size` bytes (the exporter's VmmAllocation::size()) of the memory that `fd` stands for,
  // on the device with PCI bus id `pci_bus_id`. `fd` stays the caller's: it is not closed here.
  // With `read_only`, the device may only read the mapping; a driver that refuses read-only
  // access gets a read-write mapping instead, which read_only() then reports.
  VmmMapping(const std::string& pci_bus_id, int fd, uint64_t size, bool read_only);
  ~VmmMapping();  // close()
  VmmMapping(const VmmMapping&) = delete;
  VmmMapping& operator=(const VmmMapping&) = delete;

  uint64_t address() const;  // throws sllm::Error(kDevice) once closed
  uint64_t size() const { return size_; }
  int ordinal() const { return ordinal_; }  // in this process's numbering
  bool read_only() const { return read_only_; }

  // Unmaps the memory and frees the address range; idempotent, never throws.
  void close() noexcept;

 private:
  const cuda::Driver* drv_;
  int ordinal_ = -1;
  uint64_t size_ = 0;
  bool read_only_ = false;
  std::unique_ptr<cuda::PrimaryContextRef> ctx_;
  cuda::CUmemGenericAllocationHandle handle_ = 0;  // held from the import until the mapping is made
  bool imported_ = false;
  cuda::CUdeviceptr address_ = 0;
  bool mapped_ = false;
};

// Copies n bytes of device memory from `src` to `dst` (device `ordinal`, or memory mapped there)
// on a stream of its own (unordered with other streams: the caller finishes the work that writes
// `src` first), and returns once the copy is done.
void copy_device_to_device(int ordinal, uint64_t dst, uint64_t src, uint64_t n);

// (free, total) bytes of device `ordinal`'s memory, as the driver counts them.
std::pair<uint64_t, uint64_t> device_memory_info(int ordinal);

}  // namespace sllm
