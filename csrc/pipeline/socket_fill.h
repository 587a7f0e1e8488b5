// Reading a connected socket straight into a StagedCopier::Fill (the remote tier's presigned
// GETs over plain HTTP, sllm_store/remote/signed_gets.py).
//
// Python's http.client reads a body one recv() at a time, each through the interpreter (the GIL
// taken and given back per read, about 27 000 times a second at 7 GB/s), and the fill hashes a
// staging block's bytes only when the block is committed, after most of them have left the CPU
// cache. Here the whole rest of the body is read without the GIL: each recv() lands in the
// current staging block and is committed (hashed) at once, while its bytes are still in cache.
#pragma once

#include <cstddef>

#include "pipeline/staged_copier.h"

namespace sllm {

struct SocketFillResult {
  size_t got = 0;  // bytes read into the fill
  // 0: done, or the peer closed the connection (then got < n); an errno (ETIMEDOUT: no byte
  // came for timeout_ms) otherwise; -1: the fill has no page-locked block to read into (the
  // caller goes on another way: Fill::add).
  int error = 0;
};

// Reads up to n bytes from `fd` (a connected stream socket, blocking or not) into `fill`,
// waiting at most timeout_ms (< 0: for ever) for each recv(). Throws like Fill::commit.
SocketFillResult recv_into_fill(int fd, StagedCopier::Fill& fill, size_t n, int timeout_ms);

}  // namespace sllm
