// What this process's malloc does with large blocks, which obstore's GET bodies are.
//
// Where a block starts (malloc_offset), so that a GET can be arranged to land page-aligned.
// Keeping large blocks in the heap, so that their pages stay faulted in (keep_large_blocks).
//
// obstore returns each ranged GET's body in a fresh malloc block. glibc serves a block above its
// mmap threshold (at most 32 MiB, however it adapts) with a new mapping, which the body then
// faults in page by page and which is unmapped when the body is freed: for 32 MiB chunks every
// GET pays about 8 000 page faults, 60 % of the GETs' client CPU on the H200 machine
// (bench_get_malloc.py, run X). Raising the threshold just above the chunk size keeps the
// bodies in the heap, where a freed one is reused by the next GET with its pages in place.
#pragma once

#include <cstddef>

namespace sllm {

// Where in its 4 KiB page this process's malloc() starts a block of n bytes: allocates one,
// frees it, and returns its address modulo 4096. Large blocks get a mapping of their own and
// start a fixed header past a page boundary (16 bytes with glibc), so this predicts where a
// buffer of that size from another library that allocates through malloc (obstore's GET
// bodies) will start; smaller blocks come from the heap and their offsets vary.
size_t malloc_offset(size_t n);

// mallopt(M_MMAP_THRESHOLD) to max(block, 32 MiB) + 64 KiB and M_TRIM_THRESHOLD to twice that
// (glibc's own dynamic rule), for the rest of the process. Returns true if applied (glibc only;
// elsewhere, or if glibc refuses the value, nothing changes).
bool keep_large_blocks(size_t block);

// malloc_trim(0): hand the heap's free pages back to the system (after a download, whose
// bodies the heap now holds free). Returns true if memory was released.
bool release_free_heap();

}  // namespace sllm
