#include "format/checksum.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "format/xxh3_avx2.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

namespace sllm {

// Every XXH3 of the library goes through xxh3_64 and Xxh3::update: AVX2 where the CPU has it.
uint64_t xxh3_64(const void* data, size_t size) {
  return xxh3_avx2::available() ? xxh3_avx2::hash(data, size) : XXH3_64bits(data, size);
}

struct Xxh3::State {
  XXH3_state_t* s = XXH3_createState();
  ~State() { XXH3_freeState(s); }
};

Xxh3::Xxh3() : state_(new State()) {
  if (state_->s == nullptr) throw std::bad_alloc();
  XXH3_64bits_reset(state_->s);
}

Xxh3::~Xxh3() = default;

void Xxh3::update(const void* data, size_t size) {
  if (xxh3_avx2::available())
    xxh3_avx2::update(state_->s, data, size);
  else
    XXH3_64bits_update(state_->s, data, size);
}

namespace {

// memcpy with non-temporal stores: the copy's destination (a page-locked staging block, read
// next by a DMA, not by this core) is written straight to memory, without first reading each of
// its cache lines in and without evicting the source from the cache. Followed by a fence, so that
// the stores are visible before the DMA that reads them is queued.
void copy_streaming(char* d, const char* s, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
  std::memcpy(d + i, s + i, n - i);
#else
  std::memcpy(d, s, n);
#endif
}

}  // namespace

void Xxh3::copy_update(void* dst, const void* src, size_t size) {
  constexpr size_t kBlock = 256u << 10;  // fits in L2 with room to spare
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  for (size_t pos = 0; pos < size; pos += kBlock) {
    const size_t n = std::min(kBlock, size - pos);
    update(s + pos, n);  // src into the cache, where the copy finds it
    copy_streaming(d + pos, s + pos, n);
  }
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

uint64_t Xxh3::digest() const { return XXH3_64bits_digest(state_->s); }

void Xxh3::reset() { XXH3_64bits_reset(state_->s); }

ChunkHasher::ChunkHasher(uint64_t chunk_size) : chunk_size_(chunk_size) {
  if (chunk_size == 0) throw std::invalid_argument("chunk_size must be positive");
}

ChunkHasher::~ChunkHasher() = default;

void ChunkHasher::update(const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    uint64_t take = std::min<uint64_t>(size, chunk_size_ - in_chunk_);
    hash_.update(p, take);
    p += take;
    size -= take;
    in_chunk_ += take;
    total_ += take;
    if (in_chunk_ == chunk_size_) {
      digests_.push_back(hash_.digest());
      hash_.reset();
      in_chunk_ = 0;
    }
  }
}

std::vector<uint64_t> ChunkHasher::finish() {
  if (in_chunk_ > 0) {
    digests_.push_back(hash_.digest());
    hash_.reset();
    in_chunk_ = 0;
  }
  return std::move(digests_);
}

}  // namespace sllm
