#include "format/codec.h"

#include <cstring>

#include "common/errors.h"
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_d_forceIgnoreChecksum
#include "third_party/zstd/zstd.h"

namespace sllm {

namespace {

template <int G>
void ungroup_fixed(const char* src, char* dst, size_t m) {
  const char* s[G];
  for (int k = 0; k < G; ++k) s[k] = src + static_cast<size_t>(k) * m;
  for (size_t i = 0; i < m; ++i)
    for (int k = 0; k < G; ++k) dst[i * G + k] = s[k][i];
}

template <int G>
void group_fixed(const char* src, char* dst, size_t m) {
  for (size_t i = 0; i < m; ++i)
    for (int k = 0; k < G; ++k) dst[static_cast<size_t>(k) * m + i] = src[i * G + k];
}

}  // namespace

void ungroup_bytes(const char* src, char* dst, size_t n, int group) {
  if (group <= 1) {
    std::memcpy(dst, src, n);
    return;
  }
  const size_t g = static_cast<size_t>(group);
  const size_t m = n / g;
  switch (group) {
    case 2: ungroup_fixed<2>(src, dst, m); break;
    case 4: ungroup_fixed<4>(src, dst, m); break;
    case 8: ungroup_fixed<8>(src, dst, m); break;
    default:
      for (size_t i = 0; i < m; ++i)
        for (size_t k = 0; k < g; ++k) dst[i * g + k] = src[k * m + i];
  }
  std::memcpy(dst + m * g, src + m * g, n - m * g);
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
                          size_t raw_len, char* scratch, const std::string& what, bool frame_checksum) {
  char* out = group > 1 ? scratch : dst;
  if (codec == Codec::kNone) {
    if (stored_len != raw_len)
      throw Error(ErrorKind::kFormat, what + ": raw chunk of " + std::to_string(stored_len) +
                                          " bytes, expected " + std::to_string(raw_len));
    if (group > 1) {
      ungroup_bytes(src, dst, raw_len, group);
    } else if (src != dst) {
      std::memcpy(dst, src, raw_len);
    }
    return;
  }
  if (codec != Codec::kZstd)
    throw Error(ErrorKind::kFormat, what + ": unknown codec #" + std::to_string(static_cast<int>(codec)));
  if (!impl_->dctx) {
    impl_->dctx = ZSTD_createDCtx();
    if (!impl_->dctx) throw Error(ErrorKind::kOutOfMemory, "cannot create a zstd decompression context");
  }
  ZSTD_DCtx_setParameter(impl_->dctx, ZSTD_d_forceIgnoreChecksum,
                         frame_checksum ? ZSTD_d_validateChecksum : ZSTD_d_ignoreChecksum);
  size_t got = ZSTD_decompressDCtx(impl_->dctx, out, raw_len, src, stored_len);
  if (ZSTD_isError(got))
    throw Error(ErrorKind::kChecksum, what + ": compressed data is corrupted (zstd: " +
                                          ZSTD_getErrorName(got) + ")");
  if (got != raw_len)
    throw Error(ErrorKind::kChecksum, what + ": decompressed to " + std::to_string(got) +
                                          " bytes, expected " + std::to_string(raw_len));
  if (group > 1) ungroup_bytes(scratch, dst, raw_len, group);
}

}  // namespace sllm
