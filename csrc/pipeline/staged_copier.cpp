#include "pipeline/staged_copier.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>

#include "common/errors.h"
#include "common/threads.h"
#include "format/checksum.h"

namespace sllm {

StagedCopier::StagedCopier(std::vector<Destination> dests, size_t block_size, int blocks, int readers,
                           size_t reader_size)
    : dests_(std::move(dests)), block_size_(std::max<size_t>(block_size, 1)),
      reader_size_(reader_size > 0 ? reader_size : block_size_) {
  blocks = std::max(1, blocks);
  readers = std::max(0, readers);
  for (const auto& d : dests_) {
    if (!d.device) throw Error(ErrorKind::kFormat, "a destination without a device");
    Device* dev = d.device.get();
    if (!dev->host_addressable() && std::find(devices_.begin(), devices_.end(), dev) == devices_.end())
      devices_.push_back(dev);
  }
  for (Device* dev : devices_) dev->begin(blocks + readers);  // a stream per block and per reader
  blocks_.buffers.resize(static_cast<size_t>(blocks));
  readers_.buffers.resize(static_cast<size_t>(readers));
  if (devices_.empty()) {
    for (int i = blocks - 1; i >= 0; --i) blocks_.free.push_back(i);  // host memory only: no staging
    for (int i = readers - 1; i >= 0; --i) readers_.free.push_back(i);
  } else {
    maker_ = start_thread([this] { make_buffers(); });
  }
}

namespace {
int64_t nanoseconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void StagedCopier::make_buffers() {
  // Never throws: a buffer that cannot be made leaves its block, and every later one, to copies
  // from the chunk itself (the driver's pageable path), and says why in pin_error().
  // The staging blocks first (the load waits for them), then the readers': buffer i of all.
  const size_t blocks = blocks_.buffers.size();
  const size_t all = blocks + readers_.buffers.size();
  auto at = [&](size_t i) -> std::pair<FreeList&, int> {
    if (i < blocks) return {blocks_, static_cast<int>(i)};
    return {readers_, static_cast<int>(i - blocks)};
  };
  size_t i = 0;
  try {
    HostAllocator alloc = devices_.front()->staging_allocator();
    for (; i < all && !stopping_; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      HostBuffer buf = alloc(i < blocks ? block_size_ : reader_size_);
      alloc_ns_ += nanoseconds_since(t0);
      auto [list, k] = at(i);
      {
        std::lock_guard<std::mutex> lock(mu_);
        list.buffers[static_cast<size_t>(k)] = std::move(buf);
        if (&list == &blocks_) ++made_;
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
  blocks_.freed.notify_all();
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

int StagedCopier::try_take(FreeList& list) {
  std::lock_guard<std::mutex> lock(mu_);
  if (list.free.empty()) return -1;
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

std::unique_ptr<StagedCopier::Fill> StagedCopier::fill(size_t n, std::vector<Piece> pieces) {
  return std::make_unique<Fill>(*this, n, std::move(pieces));
}

uint64_t StagedCopier::copy(const char* src, size_t n, const std::vector<Piece>& pieces) {
  Fill f(*this, n, pieces);
  f.add(src, n);
  return f.finish();
}

StagedCopier::Fill::Fill(StagedCopier& copier, size_t n, std::vector<Piece> pieces)
    : c_(copier), n_(n), pieces_(std::move(pieces)) {
  c_.check(pieces_, n_);
}

StagedCopier::Fill::~Fill() { release(); }

StagedCopier::Fill::Sent StagedCopier::Fill::send(const char* from, uint64_t lo, uint64_t hi, int block) {
  const int stream = std::max(block, 0);  // host memory only: no streams (and no block)
  try {
    for (const auto& p : pieces_) {
      const uint64_t a = std::max(lo, p.chunk_offset);
      const uint64_t b = std::min(hi, p.chunk_offset + p.length);
      if (a >= b) continue;
      const auto& d = c_.dests_[static_cast<size_t>(p.dest)];
      d.device->copy_from_host(d.base + p.dest_offset + (a - p.chunk_offset), from + (a - lo), b - a, stream);
    }
    Sent sent{block, {}};
    for (Device* dev : c_.devices_) sent.tokens.push_back(dev->record(stream));
    return sent;
  } catch (...) {
    for (Device* dev : c_.devices_) dev->drain(stream);  // copies issued before may still read `from`
    throw;
  }
}

void StagedCopier::Fill::retire() {
  Sent sent = std::move(sent_.front());
  sent_.pop_front();
  try {
    for (size_t i = 0; i < c_.devices_.size(); ++i) c_.devices_[i]->wait(sent.block, sent.tokens[i]);
  } catch (...) {
    for (Device* dev : c_.devices_) dev->drain(sent.block);  // nothing reads the block once it is back
    c_.give(c_.blocks_, sent.block);
    throw;
  }
  c_.give(c_.blocks_, sent.block);
}

void StagedCopier::Fill::take_block() {
  block_ = c_.try_take(c_.blocks_);
  if (block_ < 0) {  // none free: wait holding none, so that no two fills wait on each other
    while (!sent_.empty()) retire();
    block_ = c_.take(c_.blocks_, true);
  }
  block_from_ = pos_;
}

void StagedCopier::Fill::filled(size_t k) {
  const size_t at = pos_ - block_from_;
  pos_ += k;
  if (at + k == c_.block_size_ || pos_ == n_) {  // full: on to the destinations
    const HostBuffer& buf = c_.blocks_.buffers[static_cast<size_t>(block_)];
    sent_.push_back(send(static_cast<const char*>(buf.data()), block_from_, pos_, block_));
    block_ = -1;
    while (sent_.size() > 1) retire();  // one block in flight while the next fills
  }
}

void StagedCopier::Fill::add(const char* src, size_t len) {
  if (len > n_ - pos_)
    throw Error(ErrorKind::kFormat, "more bytes than the chunk's " + std::to_string(n_) + " (" +
                                        std::to_string(pos_) + " + " + std::to_string(len) + ")");
  if (c_.devices_.empty()) {  // host memory only: plain copies
    hash_.update(src, len);
    send(src, pos_, pos_ + len, -1);
    pos_ += len;
    return;
  }
  while (len > 0) {
    if (block_ < 0) take_block();
    HostBuffer& buf = c_.blocks_.buffers[static_cast<size_t>(block_)];
    if (buf.data() == nullptr) {  // no page-locked block: straight from src, done before returning
      hash_.update(src, len);
      sent_.push_back(send(src, pos_, pos_ + len, block_));
      block_ = -1;
      pos_ += len;
      while (!sent_.empty()) retire();
      return;
    }
    const size_t at = pos_ - block_from_;
    const size_t k = std::min(len, c_.block_size_ - at);
    hash_.copy_update(static_cast<char*>(buf.data()) + at, src, k);
    src += k;
    len -= k;
    filled(k);
  }
}

uint64_t StagedCopier::Fill::finish() {
  if (pos_ != n_)
    throw Error(ErrorKind::kFormat, "the chunk ended after " + std::to_string(pos_) + " of its " +
                                        std::to_string(n_) + " bytes");
  while (!sent_.empty()) retire();
  return hash_.digest();
}

void StagedCopier::Fill::release() noexcept {
  if (block_ >= 0) {  // nothing sent from it
    c_.give(c_.blocks_, block_);
    block_ = -1;
  }
  while (!sent_.empty()) {
    try {
      retire();
    } catch (...) {  // never throw from a destructor: the block is given back all the same
    }
  }
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
  const int stream = static_cast<int>(blocks_.buffers.size()) + reader;
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
    for (Device* dev : devices_) dev->drain(stream);  // copies issued before may still write the buffer
    throw;
  }
  use(dst, xxh3_64(dst, n));
}

}  // namespace sllm
