// Error type thrown by the C++ core. Each carries a kind that bindings.cpp maps onto the
// Python exception hierarchy in sllm_store/errors.py, so a failure in any worker thread reaches
// Python as the right exception class with a message naming the file and the problem.
#pragma once

#include <stdexcept>
#include <string>

namespace sllm {

enum class ErrorKind {
  kFormat,     // malformed plan / index data handed to the core
  kMissing,    // a file does not exist
  kTruncated,  // a file is shorter than expected
  kChecksum,   // checksum mismatch
  kRead,       // operating-system I/O error
  kDevice,     // device unavailable or copy failed
  kOutOfMemory,
  kCancelled,  // the load was cancelled (Ctrl-C or another worker's error)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace sllm
