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

// kMapped: the destination of every read is a private memory mapping of the same file range
// (made by the caller); "reading" faults those pages in, in parallel, without a copy.
enum class IoMode { kBuffered, kDirect, kMapped };

// Alignment that O_DIRECT needs for offsets, lengths and buffer addresses (safe for all common
// block devices); the format pads data files to it.
constexpr size_t kDirectAlignment = 4096;

class FileReader {
 public:
  FileReader(const std::string& path, IoMode mode);
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  // Reads exactly `size` bytes at `offset` into `dst`. Throws sllm::Error (kTruncated when the
  // file ends first, kRead on an I/O error). Thread-safe: uses pread only.
  void read_exact(void* dst, size_t size, uint64_t offset);

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  bool direct() const { return direct_fd_ >= 0 && !direct_failed_.load(); }

 private:
  void populate(void* dst, size_t size);
  size_t pread_full(int fd, char* dst, size_t size, uint64_t offset);

  std::string path_;
  int fd_ = -1;
  int direct_fd_ = -1;
  bool mapped_ = false;
  uint64_t size_ = 0;
  std::atomic<bool> direct_failed_{false};
};

}  // namespace sllm
