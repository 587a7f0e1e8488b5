// Host memory as a destination: synchronous memcpy, and reads straight into the destination.
#pragma once

#include "device/device.h"

namespace sllm {

class CpuDevice final : public Device {
 public:
  std::string name() const override { return "cpu"; }
  bool host_addressable() const override { return true; }
  void copy_from_host(void* dst, const void* src, size_t n, int worker) override;
  void prepare_destination(void* dst, size_t n) override;
};

}  // namespace sllm
