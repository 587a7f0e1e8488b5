#include "format/xxh3_avx2.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLLM_XXH3_AVX2 1
#else
#define SLLM_XXH3_AVX2 0
#endif

#if SLLM_XXH3_AVX2
// Everything defined from here to pop_options, xxHash's inline functions and the wrappers that
// call them, is compiled for AVX2; it only runs where available() said so.
#pragma GCC push_options
#pragma GCC target("avx2")
#include <immintrin.h>  // xxhash.h includes it only where the whole build targets AVX2
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include "xxhash/xxhash.h"

namespace sllm::xxh3_avx2 {
namespace {
uint64_t hash_impl(const void* data, size_t size) { return XXH3_64bits(data, size); }
void update_impl(void* state, const void* data, size_t size) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state), data, size);
}
}  // namespace
}  // namespace sllm::xxh3_avx2
#pragma GCC pop_options
#endif

namespace sllm::xxh3_avx2 {

bool available() {
#if SLLM_XXH3_AVX2
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

uint64_t hash(const void* data, size_t size) {
#if SLLM_XXH3_AVX2
  return hash_impl(data, size);
#else
  (void)data;
  (void)size;
  return 0;
#endif
}

void update(void* state, const void* data, size_t size) {
#if SLLM_XXH3_AVX2
  update_impl(state, data, size);
#else
  (void)state;
  (void)data;
  (void)size;
#endif
}

}  // namespace sllm::xxh3_avx2
