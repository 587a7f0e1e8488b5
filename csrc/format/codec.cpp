#include "format/codec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/errors.h"
#include "format/checksum.h"
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_d_forceIgnoreChecksum
#include "third_party/zstd/zstd.h"

namespace sllm {

namespace {

constexpr size_t kHashedPiece = 256 << 10;  // bytes un-grouped, then hashed while in the CPU's cache

// Elements [i0, i1) of the m-element grouped streams at src, in element order at dst.
template <int G>
void ungroup_fixed(const char* src, char* dst, size_t m, size_t i0, size_t i1) {
  const char* s[G];
  for (int k = 0; k < G; ++k) s[k] = src + static_cast<size_t>(k) * m;
  for (size_t i = i0; i < i1; ++i)
    for (int k = 0; k < G; ++k) dst[i * G + k] = s[k][i];
}

// Group 2 (bf16, fp16), little-endian: each element as one 16-bit word, which compilers vectorise
// (about twice the speed of the byte loop above).
void ungroup_pairs(const char* src, char* dst, size_t m, size_t i0, size_t i1) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  const auto* lo = reinterpret_cast<const uint8_t*>(src);
  const auto* hi = lo + m;
  for (size_t i = i0; i < i1; ++i) {
    const uint16_t w = static_cast<uint16_t>(lo[i] | (hi[i] << 8));
    std::memcpy(dst + 2 * i, &w, sizeof w);
  }
#else
  ungroup_fixed<2>(src, dst, m, i0, i1);
#endif
}

void ungroup_range(const char* src, char* dst, size_t m, size_t g, size_t i0, size_t i1) {
  switch (g) {
    case 2: ungroup_pairs(src, dst, m, i0, i1); break;
    case 4: ungroup_fixed<4>(src, dst, m, i0, i1); break;
    case 8: ungroup_fixed<8>(src, dst, m, i0, i1); break;
    default:
      for (size_t i = i0; i < i1; ++i)
        for (size_t k = 0; k < g; ++k) dst[i * g + k] = src[k * m + i];
  }
}

template <int G>
void group_fixed(const char* src, char* dst, size_t m) {
  for (size_t i = 0; i < m; ++i)
    for (int k = 0; k < G; ++k) dst[static_cast<size_t>(k) * m + i] = src[i * G + k];
}

}  // namespace

void ungroup_bytes(const char* src, char* dst, size_t n, int group, Xxh3* hash) {
  if (group <= 1) {
    std::memcpy(dst, src, n);
    if (hash) hash->update(dst, n);
    return;
  }
  const size_t g = static_cast<size_t>(group);
  const size_t m = n / g;
  // With a hash: in pieces small enough to be hashed while they are still in the CPU's cache.
  const size_t per = hash ? kHashedPiece / g : std::max<size_t>(m, 1);
  for (size_t i0 = 0; i0 < m; i0 += per) {
    const size_t i1 = std::min(m, i0 + per);
    ungroup_range(src, dst, m, g, i0, i1);
    if (hash) hash->update(dst + i0 * g, (i1 - i0) * g);
  }
  std::memcpy(dst + m * g, src + m * g, n - m * g);
  if (hash) hash->update(dst + m * g, n - m * g);
}

void group_bytes(const char* src, char* dst, size_t n, int group) {
  if (group <= 1) {
    std::memcpy(dst, src, n);
    return;
  }
  const size_t g = static_cast<size_t>(group);
  const size_t m = n / g;
  switch (group) {
    case 2: group_fixed<2>(src, dst, m); break;
    case 4: group_fixed<4>(src, dst, m); break;
    case 8: group_fixed<8>(src, dst, m); break;
    default:
      for (size_t i = 0; i < m; ++i)
        for (size_t k = 0; k < g; ++k) dst[k * m + i] = src[i * g + k];
  }
  std::memcpy(dst + m * g, src + m * g, n - m * g);
}

struct ChunkDecoder::Impl {
  ZSTD_DCtx* dctx = nullptr;
  ~Impl() {
    if (dctx) ZSTD_freeDCtx(dctx);
  }
};

ChunkDecoder::ChunkDecoder() : impl_(std::make_unique<Impl>()) {}
ChunkDecoder::~ChunkDecoder() = default;

void ChunkDecoder::decode(Codec codec, int group, const char* src, size_t stored_len, char* dst,
                          size_t raw_len, char* scratch, const std::string& what, Xxh3* hash) {
  if (codec == Codec::kNone) {
    if (stored_len != raw_len)
      throw Error(ErrorKind::kFormat, what + ": raw chunk of " + std::to_string(stored_len) +
                                          " bytes, expected " + std::to_string(raw_len));
    if (group > 1) {
      ungroup_bytes(src, dst, raw_len, group, hash);
      return;
    }
    if (src != dst) std::memcpy(dst, src, raw_len);
    if (hash) hash->update(dst, raw_len);
    return;
  }
  if (codec != Codec::kZstd)
    throw Error(ErrorKind::kFormat, what + ": unknown codec #" + std::to_string(static_cast<int>(codec)));
  if (!impl_->dctx) {
    impl_->dctx = ZSTD_createDCtx();
    if (!impl_->dctx) throw Error(ErrorKind::kOutOfMemory, "cannot create a zstd decompression context");
  }
  // The caller's hash covers the decoded bytes: the frame's checksum of them would be a second one.
  ZSTD_DCtx_setParameter(impl_->dctx, ZSTD_d_forceIgnoreChecksum,
                         hash ? ZSTD_d_ignoreChecksum : ZSTD_d_validateChecksum);
  char* out = group > 1 ? scratch : dst;
  size_t got = ZSTD_decompressDCtx(impl_->dctx, out, raw_len, src, stored_len);
  if (ZSTD_isError(got))
    throw Error(ErrorKind::kChecksum, what + ": compressed data is corrupted (zstd: " +
                                          ZSTD_getErrorName(got) + ")");
  if (got != raw_len)
    throw Error(ErrorKind::kChecksum, what + ": decompressed to " + std::to_string(got) +
                                          " bytes, expected " + std::to_string(raw_len));
  if (group > 1)
    ungroup_bytes(scratch, dst, raw_len, group, hash);
  else if (hash)
    hash->update(dst, raw_len);
}

}  // namespace sllm
