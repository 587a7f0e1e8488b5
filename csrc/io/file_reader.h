// Positional reads of one local data file, buffered or with O_DIRECT.
//
// A FileReader owns its descriptors (RAII). In direct mode it opens the file with O_DIRECT; if
// the filesystem refuses (EINVAL at open, e.g. tmpfs) or a direct read fails with EINVAL, it
// falls back to buffered reads for the rest of its life and reports that through direct().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace sllm {

// kMapped: destinations are private memory mappings of the same file ranges (made by the
// caller); "reading" them faults the pages in (populate_mapping), in parallel, without a copy.
// Reads into other memory (staging buffers) are buffered.
enum class IoMode { kBuffered, kDirect, kMapped };

// Alignment that O_DIRECT needs for offsets, lengths and buffer addresses (safe for all common
// block devices); the format pads data files to it.
constexpr size_t kDirectAlignment = 4096;

// Opens `path` for reading without blocking (a FIFO or device where a data file should be would
// otherwise hang the open or the reads) and only if it is a regular file; `extra_flags` are added
// to O_RDONLY | O_CLOEXEC (O_DIRECT, say). Returns the descriptor, in blocking mode, or -1 with
// errno set (EINVAL: not a regular file).
int open_regular(const std::string& path, int extra_flags = 0);

class FileReader {
 public:
  FileReader(const std::string& path, IoMode mode);
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  // Reads exactly `size` bytes at `offset` into `dst`. Throws sllm::Error (kTruncated when the
  // file ends first, kRead on an I/O error). Thread-safe: uses pread only.
  void read_exact(void* dst, size_t size, uint64_t offset);

  // Faults in [dst, dst+size), a private mapping of this file made by the caller.
  void populate_mapping(void* dst, size_t size);

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  bool direct() const { return direct_fd_ >= 0 && !direct_failed_.load(); }
  // Reads that actually went through O_DIRECT (others fell back to buffered).
  uint64_t direct_reads() const { return direct_reads_.load(); }

 private:
  size_t pread_full(int fd, char* dst, size_t size, uint64_t offset);

  std::string path_;
  int fd_ = -1;
  int direct_fd_ = -1;
  uint64_t size_ = 0;
  std::atomic<bool> direct_failed_{false};
  std::atomic<uint64_t> direct_reads_{0};
};

}  // namespace sllm
