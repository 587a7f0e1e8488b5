#include "format/checksum.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

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

void Xxh3::copy_update(void* dst, const void* src, size_t size) {
  constexpr size_t kBlock = 256u << 10;  // fits in L2 with room to spare
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  for (size_t pos = 0; pos < size; pos += kBlock) {
    const size_t n = std::min(kBlock, size - pos);
    std::memcpy(d + pos, s + pos, n);
    update(d + pos, n);
  }
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
