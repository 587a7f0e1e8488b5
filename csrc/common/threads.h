// Starting and joining worker threads.
//
// A thread that cannot be started (the process is out of threads or memory) is reported as
// sllm::Error(kOutOfMemory) rather than std::system_error, and a ThreadGroup joins every thread it
// started whatever happens, so that a failure to start the fifth worker stops the first four
// instead of terminating the process with joinable threads.
#pragma once

#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "common/errors.h"

namespace sllm {

template <class F>
std::thread start_thread(F&& f) {
  try {
    return std::thread(std::forward<F>(f));
  } catch (const std::system_error& e) {
    throw Error(ErrorKind::kOutOfMemory, std::string("cannot start a thread: ") + e.what());
  }
}

// Joins every thread it holds when it goes out of scope.
class ThreadGroup {
 public:
  ThreadGroup() = default;
  ThreadGroup(const ThreadGroup&) = delete;
  ThreadGroup& operator=(const ThreadGroup&) = delete;
  ~ThreadGroup() { join(); }

  template <class F>
  void spawn(F&& f) { threads_.push_back(start_thread(std::forward<F>(f))); }

  void join() {
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }

 private:
  std::vector<std::thread> threads_;
};

}  // namespace sllm
