#include "pipeline/staged_copier.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>

#include "common/errors.h"
#include "format/checksum.h"

namespace sllm {

StagedCopier::StagedCopier(std::vector<Destination> dests, size_t staging_size, int slots, int readers)
    : dests_(std::move(dests)), staging_size_(staging_size) {
  slots = std::max(1, slots);
  readers = std::max(0, readers);
  for (const auto& d : dests_) {
    if (!d.device) throw Error(ErrorKind::kFormat, "a destination without a device");
    Device* dev = d.device.get();
    if (!dev->host_addressable() && std::find(devices_.begin(), devices_.end(), dev) == devices_.end())
      devices_.push_back(dev);
  }
  for (Device* dev : devices_) dev->begin(slots + readers);  // a stream per slot and per reader
  slots_.buffers.resize(static_cast<size_t>(slots));
  readers_.buffers.resize(static_cast<size_t>(readers));
  if (devices_.empty()) {
    for (int i = slots - 1; i >= 0; --i) slots_.free.push_back(i);  // host memory only: no staging
    for (int i = readers - 1; i >= 0; --i) readers_.free.push_back(i);
  } else {
    maker_ = std::thread([this] { make_buffers(); });
  }
}

namespace {
int64_t nanoseconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void StagedCopier::make_buffers() {
  // Never throws: a buffer that cannot be made leaves its slot, and every later one, to copies
  // from the chunk itself (the driver's pageable path), and says why in pin_error().
  // The staging buffers first (the load waits for them), then the readers': buffer i of all.
  const size_t slots = slots_.buffers.size();
  const size_t all = slots + readers_.buffers.size();
  auto at = [&](size_t i) -> std::pair<FreeList&, int> {
    if (i < slots) return {slots_, static_cast<int>(i)};
    return {readers_, static_cast<int>(i - slots)};
  };
  size_t i = 0;
  try {
    HostAllocator alloc = devices_.front()->staging_allocator();
    for (; i < all && !stopping_; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      HostBuffer buf = alloc(staging_size_);
      alloc_ns_ += nanoseconds_since(t0);
      auto [list, k] = at(i);
      {
        std::lock_guard<std::mutex> lock(mu_);
        list.buffers[static_cast<size_t>(k)] = std::move(buf);
        if (&list == &slots_) ++made_;
        list.free.push_back(k);
      }
      list.freed.notify_one();
    }
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mu_);
    pin_error_ = e.what();
    unpinned_ = true;
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    pin_error_ = "unknown error";
    unpinned_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (; i < all; ++i) {  // without a buffer
      auto [list, k] = at(i);
      list.free.push_back(k);
    }
  }
  slots_.freed.notify_all();
  readers_.freed.notify_all();
}

StagedCopier::~StagedCopier() {
  stopping_ = true;
  if (maker_.joinable()) maker_.join();
  for (Device* dev : devices_) {
    try {
      dev->synchronize();
    } catch (...) {  // never throw from a destructor; copy() already waited for its copies
    }
  }
}

bool StagedCopier::staged() const { return !unpinned_; }

std::string StagedCopier::pin_error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pin_error_;
}

int StagedCopier::buffers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return made_;
}

int StagedCopier::take(FreeList& list, bool timed) {
  std::unique_lock<std::mutex> lock(mu_);
  if (list.free.empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    list.freed.wait(lock, [&list] { return !list.free.empty(); });
    if (timed) wait_ns_ += nanoseconds_since(t0);
  }
  int index = list.free.back();
  list.free.pop_back();
  return index;
}

void StagedCopier::give(FreeList& list, int index) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    list.free.push_back(index);
  }
  list.freed.notify_one();
}

struct StagedCopier::Lease {
  StagedCopier& copier;
  FreeList& list;
  const int index;
  Lease(StagedCopier& c, FreeList& l, bool timed) : copier(c), list(l), index(c.take(l, timed)) {}
  ~Lease() { copier.give(list, index); }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
};

void StagedCopier::check(const std::vector<Piece>& pieces, size_t n) const {
  for (const auto& p : pieces) {
    if (p.dest < 0 || static_cast<size_t>(p.dest) >= dests_.size())
      throw Error(ErrorKind::kFormat, "copy refers to destination #" + std::to_string(p.dest));
    if (p.chunk_offset + p.length > n || p.chunk_offset + p.length < p.chunk_offset)
      throw Error(ErrorKind::kFormat, "copy exceeds its chunk (" + std::to_string(p.chunk_offset) + "+" +
                                          std::to_string(p.length) + " > " + std::to_string(n) + ")");
    const auto& d = dests_[static_cast<size_t>(p.dest)];
    if (p.dest_offset + p.length > d.size || p.dest_offset + p.length < p.dest_offset)
      throw Error(ErrorKind::kFormat, "copy exceeds its destination (" + std::to_string(p.dest_offset) + "+" +
                                          std::to_string(p.length) + " > " + std::to_string(d.size) + ")");
  }
}

uint64_t StagedCopier::copy(const char* src, size_t n, const std::vector<Piece>& pieces) {
  check(pieces, n);
  bool to_device = false;
  for (const auto& p : pieces) to_device |= !dests_[static_cast<size_t>(p.dest)].device->host_addressable();
  if (!to_device) {  // host memory only: plain copies
    uint64_t digest = xxh3_64(src, n);
    for (const auto& p : pieces) {
      const auto& d = dests_[static_cast<size_t>(p.dest)];
      d.device->copy_from_host(d.base + p.dest_offset, src + p.chunk_offset, p.length, 0);
    }
    return digest;
  }

  const Lease lease(*this, slots_, true);
  const int slot = lease.index;
  HostBuffer& buf = slots_.buffers[static_cast<size_t>(slot)];  // none if it could not be made
  const char* from = src;
  uint64_t digest;
  if (buf.data() != nullptr && n <= buf.size()) {
    digest = copy_xxh3_64(buf.data(), src, n);
    from = static_cast<const char*>(buf.data());
  } else {
    digest = xxh3_64(src, n);
  }
  try {
    for (const auto& p : pieces) {
      const auto& d = dests_[static_cast<size_t>(p.dest)];
      d.device->copy_from_host(d.base + p.dest_offset, from + p.chunk_offset, p.length, slot);
    }
    for (Device* dev : devices_) dev->wait(slot, dev->record(slot));  // the buffer is free again
  } catch (...) {
    // Copies issued before the failure may still read the buffer: let them finish (best effort)
    // before another thread takes it.
    for (Device* dev : devices_) {
      try {
        dev->wait(slot, dev->record(slot));
      } catch (...) {
      }
    }
    throw;
  }
  return digest;
}

void StagedCopier::read_back(const std::vector<Piece>& pieces, size_t n,
                             const std::function<void(const char*, uint64_t)>& use) {
  check(pieces, n);
  if (readers_.buffers.empty()) throw Error(ErrorKind::kFormat, "read_back on a copier without readers");
  const Lease lease(*this, readers_, false);
  const int reader = lease.index;
  HostBuffer temp;
  const HostBuffer& own = readers_.buffers[static_cast<size_t>(reader)];  // none if it could not be made
  char* dst = static_cast<char*>(own.data());
  if (dst == nullptr || n > own.size()) {
    temp = allocate_aligned_host(std::max<size_t>(n, 1));
    dst = static_cast<char*>(temp.data());
  }
  // Zero what no piece covers (padding between tensors), in chunk order.
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  spans.reserve(pieces.size());
  for (const auto& p : pieces) spans.emplace_back(p.chunk_offset, p.chunk_offset + p.length);
  std::sort(spans.begin(), spans.end());
  uint64_t pos = 0;
  for (const auto& [lo, hi] : spans) {
    if (lo > pos) std::memset(dst + pos, 0, lo - pos);
    pos = std::max(pos, hi);
  }
  if (pos < n) std::memset(dst + pos, 0, n - pos);
  const int stream = static_cast<int>(slots_.buffers.size()) + reader;
  auto wait_all = [&] {
    for (Device* dev : devices_) dev->wait(stream, dev->record(stream));
  };
  try {
    for (const auto& p : pieces) {
      const auto& d = dests_[static_cast<size_t>(p.dest)];
      d.device->copy_to_host(dst + p.chunk_offset, d.base + p.dest_offset, p.length, stream);
    }
    wait_all();
  } catch (...) {
    try {
      wait_all();  // copies issued before the failure may still write the buffer
    } catch (...) {
    }
    throw;
  }
  use(dst, xxh3_64(dst, n));
}

}  // namespace sllm
