// Device registry: maps a device string onto a Device implementation.
#include <memory>
#include <string>

#include "common/errors.h"
#include "device/cpu_device.h"
#include "device/cuda_device.h"
#include "device/device.h"

namespace sllm {

std::shared_ptr<Device> make_device(const std::string& spec) {
  if (spec == "cpu") return std::make_shared<CpuDevice>();
  if (spec.rfind("cuda", 0) == 0) {
    int ordinal = 0;
    if (spec.size() > 4) {
      if (spec[4] != ':' || spec.size() == 5 ||
          spec.find_first_not_of("0123456789", 5) != std::string::npos)
        throw Error(ErrorKind::kDevice, "invalid device '" + spec + "'");
      ordinal = std::stoi(spec.substr(5));
    }
    return std::make_shared<CudaDevice>(ordinal);
  }
  throw Error(ErrorKind::kDevice, "unsupported device '" + spec + "' (supported: cpu, cuda:N)");
}

}  // namespace sllm
