// Device registry: maps a device string onto a Device implementation.
#include <memory>
#include <string>

#include "common/errors.h"
#include "device/cpu_device.h"
#include "device/device.h"

namespace sllm {

std::shared_ptr<Device> make_device(const std::string& spec) {
  if (spec == "cpu") return std::make_shared<CpuDevice>();
  throw Error(ErrorKind::kDevice, "unsupported device '" + spec + "' (this build supports: cpu)");
}

}  // namespace sllm
