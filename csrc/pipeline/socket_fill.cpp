#include "pipeline/socket_fill.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>

namespace sllm {

namespace {
// At most this much per recv(), so that commit() hashes the bytes while they are in cache.
constexpr size_t kStep = 1 << 20;
}  // namespace

SocketFillResult recv_into_fill(int fd, StagedCopier::Fill& fill, size_t n, int timeout_ms) {
  SocketFillResult r;
  while (r.got < n) {
    auto [space, room] = fill.reserve();
    if (space == nullptr) {
      r.error = -1;
      return r;
    }
    const size_t want = std::min({room, n - r.got, kStep});
    const ssize_t k = ::recv(fd, space, want, 0);
    if (k > 0) {
      fill.commit(static_cast<size_t>(k));
      r.got += static_cast<size_t>(k);
      continue;
    }
    if (k == 0) return r;  // the peer closed the connection
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      r.error = errno;
      return r;
    }
    pollfd p{fd, POLLIN, 0};  // a non-blocking socket (one with a timeout, in Python)
    const int ready = ::poll(&p, 1, timeout_ms);
    if (ready == 0) {
      r.error = ETIMEDOUT;
      return r;
    }
    if (ready < 0 && errno != EINTR) {
      r.error = errno;
      return r;
    }
  }
  return r;
}

}  // namespace sllm
