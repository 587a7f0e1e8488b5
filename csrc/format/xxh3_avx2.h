// XXH3-64 built for AVX2 (format/xxh3_avx2.cpp), for CPUs that have it. The rest of the library
// is built for the x86-64 baseline, where XXH3 runs its SSE2 code; the digests are the same.
// format/checksum.cpp picks it at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sllm::xxh3_avx2 {

// Whether it is built in (GCC on x86-64) and this CPU has AVX2.
bool available();
uint64_t hash(const void* data, size_t size);
// Adds bytes to a streaming state made by format/checksum.cpp (an XXH3_state_t there).
void update(void* state, const void* data, size_t size);

}  // namespace sllm::xxh3_avx2
