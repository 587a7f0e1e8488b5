// Where this process's malloc starts a large block, so that a GET body can be arranged to land
// page-aligned.
//
// obstore returns each ranged GET's body in a fresh malloc block. glibc serves a block above its
// mmap threshold with a mapping of its own, starting a fixed header (16 bytes) past a page
// boundary. A GET that starts that many bytes early, minus the header, puts the chunk's first byte
// on a page boundary, where an O_DIRECT write can take it without an aligning copy.
#pragma once

#include <cstddef>

namespace sllm {

// Where in its 4 KiB page this process's malloc() starts a block of n bytes: allocates one,
// frees it, and returns its address modulo 4096. Large blocks get a mapping of their own and
// start a fixed header past a page boundary, so this predicts where a buffer of that size from
// another library that allocates through malloc (obstore's GET bodies) will start; smaller
// blocks come from the heap and their offsets vary.
size_t malloc_offset(size_t n);

}  // namespace sllm
