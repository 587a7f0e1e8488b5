#include "io/file_reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "common/errors.h"

namespace sllm {

namespace {

std::string errno_text(int err) { return std::string(std::strerror(err)); }

bool aligned(uint64_t v) { return v % kDirectAlignment == 0; }

}  // namespace

int open_regular(const std::string& path, int extra_flags) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | extra_flags);
  if (fd < 0) return -1;
  struct stat st;
  const int err = ::fstat(fd, &st) != 0 ? errno : (S_ISREG(st.st_mode) ? 0 : EINVAL);
  if (err != 0) {
    ::close(fd);
    errno = err;
    return -1;
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

FileReader::FileReader(const std::string& path, IoMode mode) : path_(path) {
  fd_ = open_regular(path);
  if (fd_ < 0) {
    int err = errno;
    if (err == EINVAL)
      throw Error(ErrorKind::kFormat, "data file '" + path + "' is not a regular file");
    throw Error(err == ENOENT ? ErrorKind::kMissing : ErrorKind::kRead,
                "cannot open data file '" + path + "': " + errno_text(err));
  }
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    int err = errno;
    ::close(fd_);
    throw Error(ErrorKind::kRead, "cannot stat data file '" + path + "': " + errno_text(err));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (mode == IoMode::kDirect) {
#ifdef O_DIRECT
    direct_fd_ = open_regular(path, O_DIRECT);
    // EINVAL: the filesystem does not support O_DIRECT; stay buffered.
#endif
  }
}

FileReader::~FileReader() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (fd_ >= 0) ::close(fd_);
}

size_t FileReader::pread_full(int fd, char* dst, size_t size, uint64_t offset) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, dst + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return static_cast<size_t>(-1);  // an I/O error, even after some bytes: caller inspects errno
    }
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
  }
  return done;
}

void FileReader::populate_mapping(void* dst, size_t size) {
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif
  if (size == 0) return;
  if (::madvise(dst, size, MADV_POPULATE_READ) == 0) return;
  if (errno == EFAULT || errno == EIO)
    throw Error(ErrorKind::kRead, "cannot read mapped pages of '" + path_ + "': " + errno_text(errno));
  // Older kernel: touch one byte per page.
  const volatile char* p = static_cast<const volatile char*>(dst);
  const long page = ::sysconf(_SC_PAGESIZE);
  char sink = 0;
  for (size_t i = 0; i < size; i += static_cast<size_t>(page)) sink ^= p[i];
  sink ^= p[size - 1];
  (void)sink;
}

void FileReader::read_exact(void* dst, size_t size, uint64_t offset) {
  char* out = static_cast<char*>(dst);
  const bool can_direct = direct() && aligned(offset) && aligned(size) &&
                          aligned(reinterpret_cast<uintptr_t>(dst));
  if (can_direct) {
    errno = 0;
    size_t got = pread_full(direct_fd_, out, size, offset);
    if (got == size) {
      direct_reads_++;
      return;
    }
    if (got == static_cast<size_t>(-1) && errno == EINVAL) {
      direct_failed_.store(true);  // filesystem refused a direct read: buffered from now on
    } else if (got == static_cast<size_t>(-1)) {
      int err = errno;
      throw Error(ErrorKind::kRead, "read of '" + path_ + "' at offset " +
                                        std::to_string(offset) + " failed: " + errno_text(err));
    } else {
      throw Error(ErrorKind::kTruncated,
                  "data file '" + path_ + "' is truncated: wanted " + std::to_string(size) +
                      " bytes at offset " + std::to_string(offset) + ", file ends after " +
                      std::to_string(offset + got));
    }
  }
  errno = 0;
  size_t got = pread_full(fd_, out, size, offset);
  if (got == size) return;
  if (got == static_cast<size_t>(-1)) {
    int err = errno;
    throw Error(ErrorKind::kRead, "read of '" + path_ + "' at offset " + std::to_string(offset) +
                                      " failed: " + errno_text(err));
  }
  throw Error(ErrorKind::kTruncated,
              "data file '" + path_ + "' is truncated: wanted " + std::to_string(size) +
                  " bytes at offset " + std::to_string(offset) + ", file ends after " +
                  std::to_string(offset + got));
}

}  // namespace sllm
