#include "pipeline/loader.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include "common/errors.h"
#include "common/threads.h"
#include "format/checksum.h"
#include "format/codec.h"
#include "memory/buffer_pool.h"
#include "memory/pool_cache.h"

namespace sllm {

namespace {

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

class Run {
 public:
  Run(const LoadPlan& plan, const LoadOptions& options) : plan_(plan), options_(options) {}

  LoadStats execute(const std::function<bool()>& interrupted);

 private:
  void validate_and_open();
  void worker(int id);
  struct InFlight {
    int buffer;
    std::vector<uint64_t> tokens;  // one per staging device, in staging_devices_ order
    size_t chunk;
  };
  // Per-worker scratch for encoded chunks: the stored bytes, and the decoded bytes before
  // un-grouping. Allocated on first use, reused for every chunk of the load.
  struct Scratch {
    HostBuffer stored, raw;
    ChunkDecoder decoder;
    Xxh3 hash;  // of a compressed chunk's decoded bytes
  };
  void process_chunk(int id, size_t index, std::deque<InFlight>& in_flight, Scratch& scratch);
  // hash: fed the chunk's bytes as they land at dst (compressed chunks), for its checksum.
  void read_chunk(size_t index, char* dst, Scratch& scratch, Xxh3* hash = nullptr);
  void read_verified(size_t index, char* dst, Scratch& scratch);
  void verify_chunk(size_t index, const void* data) const;
  void check_digest(size_t index, uint64_t got) const;
  bool chunk_is_direct(size_t index) const;
  bool chunk_is_scattered(size_t index) const;
  bool chunk_is_staged(size_t index) const;
  uint64_t read_scattered(size_t index);
  void fail(std::exception_ptr e);
  void release_in_flight(int id, std::deque<InFlight>& in_flight, size_t keep);
  void abandon_in_flight(int id, std::deque<InFlight>& in_flight) noexcept;
  void drain(int id) noexcept;
  void landed(size_t index) {
    if (options_.progress) options_.progress->mark(index, plan_.chunks[index].length);
  }

  const LoadPlan& plan_;
  const LoadOptions& options_;
  std::vector<std::unique_ptr<FileReader>> readers_;
  std::vector<size_t> seg_begin_;  // segments of chunk i: [seg_begin_[i], seg_begin_[i+1])
  std::vector<Segment> segments_;  // sorted by chunk
  std::unique_ptr<PoolLease> lease_;
  BufferPool* pool_ = nullptr;  // the leased pool, when any chunk is staged
  std::vector<int> staging_devices_;  // destinations that receive staged copies

  std::atomic<size_t> next_{0};
  std::atomic<bool> cancel_{false};
  std::atomic<uint64_t> bytes_{0}, direct_{0}, staged_{0}, verified_{0};
  std::mutex mu_;
  std::condition_variable done_cv_;
  int running_ = 0;
  std::exception_ptr error_;
};

void Run::validate_and_open() {
  const size_t nfiles = plan_.files.size();
  for (const auto& c : plan_.chunks) {
    if (c.file < 0 || static_cast<size_t>(c.file) >= nfiles)
      throw Error(ErrorKind::kFormat, "chunk refers to file #" + std::to_string(c.file));
    if (c.offset + c.length < c.offset)
      throw Error(ErrorKind::kFormat, "chunk range overflows in '" + plan_.files[c.file] + "'");
    if (c.encoded && (c.stored_offset + c.stored_length < c.stored_offset ||
                      c.stored_length > UINT64_MAX - kDirectAlignment))
      throw Error(ErrorKind::kFormat, "stored chunk range overflows in '" + plan_.files[c.file] + "'");
  }
  for (const auto& s : plan_.segments) {
    if (s.chunk < 0 || static_cast<size_t>(s.chunk) >= plan_.chunks.size())
      throw Error(ErrorKind::kFormat, "segment refers to chunk #" + std::to_string(s.chunk));
    if (s.dest < 0 || static_cast<size_t>(s.dest) >= plan_.dests.size())
      throw Error(ErrorKind::kFormat, "segment refers to destination #" + std::to_string(s.dest));
    const auto& c = plan_.chunks[s.chunk];
    if (s.chunk_offset + s.length > c.length || s.chunk_offset + s.length < s.chunk_offset)
      throw Error(ErrorKind::kFormat, "segment exceeds its chunk in '" + plan_.files[c.file] + "'");
    const auto& d = plan_.dests[s.dest];
    if (s.dest_offset + s.length > d.size || s.dest_offset + s.length < s.dest_offset)
      throw Error(ErrorKind::kFormat, "segment exceeds its destination");
  }
  for (const auto& d : plan_.dests) {
    if (!d.device) throw Error(ErrorKind::kDevice, "destination without a device");
  }

  readers_.reserve(nfiles);
  for (const auto& f : plan_.files) readers_.push_back(std::make_unique<FileReader>(f, options_.io_mode));
  for (const auto& c : plan_.chunks) {
    const auto& r = *readers_[c.file];
    uint64_t end = c.encoded ? c.stored_offset + c.stored_length : c.offset + c.length;
    if (end > r.size()) {
      throw Error(ErrorKind::kTruncated,
                  "data file '" + r.path() + "' is truncated: " + std::to_string(r.size()) +
                      " bytes, but the index needs " + std::to_string(end));
    }
    if (c.encoded && options_.io_mode == IoMode::kMapped)
      throw Error(ErrorKind::kFormat, "compressed chunks cannot be memory-mapped ('" + r.path() + "')");
  }

  segments_ = plan_.segments;
  std::stable_sort(segments_.begin(), segments_.end(),
                   [](const Segment& a, const Segment& b) { return a.chunk < b.chunk; });
  seg_begin_.assign(plan_.chunks.size() + 1, 0);
  for (const auto& s : segments_) seg_begin_[s.chunk + 1]++;
  for (size_t i = 0; i < plan_.chunks.size(); ++i) seg_begin_[i + 1] += seg_begin_[i];
}

bool Run::chunk_is_direct(size_t index) const {
  size_t b = seg_begin_[index], e = seg_begin_[index + 1];
  if (e - b != 1) return false;
  const Segment& s = segments_[b];
  return s.chunk_offset == 0 && s.length == plan_.chunks[index].length &&
         plan_.dests[s.dest].device->host_addressable();
}

// A chunk whose pieces are read one by one straight into host destinations (tensors that exist
// already, say): plain bytes, buffered reads (O_DIRECT needs aligned pieces), nothing to verify
// (a checksum covers the whole chunk). Otherwise such a chunk is staged, its bytes copied twice.
bool Run::chunk_is_scattered(size_t index) const {
  const ChunkSpec& c = plan_.chunks[index];
  if (options_.io_mode != IoMode::kBuffered || c.encoded || (options_.verify && c.has_checksum)) return false;
  size_t b = seg_begin_[index], e = seg_begin_[index + 1];
  if (b == e) return false;
  for (size_t k = b; k < e; ++k)
    if (!plan_.dests[segments_[k].dest].device->host_addressable()) return false;
  return true;
}

bool Run::chunk_is_staged(size_t index) const {
  return !chunk_is_direct(index) && !chunk_is_scattered(index);
}

// One read per run of segments that follow each other in the file and in one destination.
// Returns the bytes read.
uint64_t Run::read_scattered(size_t index) {
  const ChunkSpec& c = plan_.chunks[index];
  FileReader& reader = *readers_[c.file];
  uint64_t total = 0;
  for (size_t k = seg_begin_[index], e = seg_begin_[index + 1]; k < e;) {
    const Segment& s = segments_[k];
    uint64_t length = s.length;
    for (++k; k < e; ++k) {
      const Segment& n = segments_[k];
      if (n.dest != s.dest || n.chunk_offset != s.chunk_offset + length || n.dest_offset != s.dest_offset + length)
        break;
      length += n.length;
    }
    reader.read_exact(plan_.dests[s.dest].base + s.dest_offset, length, c.offset + s.chunk_offset);
    total += length;
  }
  return total;
}

void Run::verify_chunk(size_t index, const void* data) const {
  check_digest(index, xxh3_64(data, plan_.chunks[index].length));
}

void Run::check_digest(size_t index, uint64_t got) const {
  const ChunkSpec& c = plan_.chunks[index];
  if (got != c.checksum) {
    throw Error(ErrorKind::kChecksum,
                "checksum mismatch in '" + plan_.files[c.file] + "' chunk at offset " +
                    std::to_string(c.offset) + " (" + std::to_string(c.length) +
                    " bytes): expected " + hex64(c.checksum) + ", got " + hex64(got));
  }
}

void Run::fail(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = e;
  }
  cancel_.store(true);
  if (pool_) pool_->cancel();
}

void Run::release_in_flight(int id, std::deque<InFlight>& in_flight, size_t keep) {
  while (in_flight.size() > keep) {
    const InFlight& f = in_flight.front();
    for (size_t k = 0; k < staging_devices_.size(); ++k)  // a throw leaves f in flight, abandoned
      plan_.dests[staging_devices_[k]].device->wait(id, f.tokens[k]);
    pool_->release(f.buffer);
    landed(f.chunk);
    in_flight.pop_front();
  }
}

void Run::drain(int id) noexcept {
  for (int d : staging_devices_) plan_.dests[d].device->drain(id);
}

// On an error: every copy this worker issued finishes (or fails) before its buffers go back.
void Run::abandon_in_flight(int id, std::deque<InFlight>& in_flight) noexcept {
  drain(id);
  for (const InFlight& f : in_flight) pool_->release(f.buffer);
  in_flight.clear();
}

void Run::read_chunk(size_t index, char* dst, Scratch& scratch, Xxh3* hash) {
  const ChunkSpec& c = plan_.chunks[index];
  FileReader& reader = *readers_[c.file];
  if (!c.encoded) {
    reader.read_exact(dst, c.length, c.offset);
    return;
  }
  // Stored chunks start 4096-aligned and the file is padded: read whole aligned blocks.
  uint64_t span = (c.stored_length + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
  if (scratch.stored.size() < span) scratch.stored = allocate_aligned_host(span);
  uint64_t avail = std::min<uint64_t>(span, reader.size() - c.stored_offset);
  reader.read_exact(scratch.stored.data(), avail, c.stored_offset);
  if (c.group > 1 && scratch.raw.size() < c.length) scratch.raw = allocate_aligned_host(c.length);
  scratch.decoder.decode(static_cast<Codec>(c.codec), c.group, static_cast<const char*>(scratch.stored.data()),
                         c.stored_length, dst, c.length, static_cast<char*>(scratch.raw.data()),
                         "'" + plan_.files[c.file] + "' chunk at offset " + std::to_string(c.offset), hash);
}

// Reads (or, mapped, faults in) a chunk into dst and checks its checksum. Reads through the page
// cache go in pieces small enough to stay in the CPU's cache until they are hashed, so the bytes
// cross the memory bus once, not twice; so do compressed chunks, hashed piece by piece as they are
// un-grouped. O_DIRECT reads, which wait on the disk and whose bytes are not in the CPU's cache
// anyway, are read whole, then hashed.
void Run::read_verified(size_t index, char* dst, Scratch& scratch) {
  constexpr size_t kHashPiece = 512 << 10;
  const ChunkSpec& c = plan_.chunks[index];
  FileReader& reader = *readers_[c.file];
  const bool mapped = options_.io_mode == IoMode::kMapped;  // never encoded (checked up front)
  if (c.encoded) {  // hashed while it is decoded, in cache-sized pieces
    scratch.hash.reset();
    read_chunk(index, dst, scratch, &scratch.hash);
    check_digest(index, scratch.hash.digest());
    return;
  }
  if (!mapped && reader.direct()) {
    read_chunk(index, dst, scratch);
    verify_chunk(index, dst);
    return;
  }
  Xxh3 hash;
  for (uint64_t done = 0; done < c.length;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kHashPiece, c.length - done));
    if (mapped)
      reader.populate_mapping(dst + done, n);
    else
      reader.read_exact(dst + done, n, c.offset + done);
    hash.update(dst + done, n);
    done += n;
  }
  check_digest(index, hash.digest());
}

void Run::process_chunk(int id, size_t index, std::deque<InFlight>& in_flight, Scratch& scratch) {
  const ChunkSpec& c = plan_.chunks[index];
  FileReader& reader = *readers_[c.file];
  const bool check = options_.verify && c.has_checksum;

  if (chunk_is_direct(index)) {
    const Segment& s = segments_[seg_begin_[index]];
    char* dst = plan_.dests[s.dest].base + s.dest_offset;
    if (check) {
      read_verified(index, dst, scratch);
      verified_++;
    } else if (options_.io_mode == IoMode::kMapped) {
      reader.populate_mapping(dst, c.length);
    } else {
      read_chunk(index, dst, scratch);
    }
    direct_++;
    bytes_ += c.length;
    landed(index);
    return;
  }
  if (chunk_is_scattered(index)) {
    bytes_ += read_scattered(index);
    direct_++;
    landed(index);
    return;
  }

  // Keep at most buffers_per_thread - 1 buffers in flight before taking another one.
  release_in_flight(id, in_flight, static_cast<size_t>(std::max(0, options_.buffers_per_thread - 1)));
  int buffer = pool_->acquire();
  if (buffer < 0) return;  // cancelled
  char* staging = static_cast<char*>(pool_->data(buffer));
  try {
    if (check) {
      read_verified(index, staging, scratch);
      verified_++;
    } else {
      read_chunk(index, staging, scratch);
    }
    for (size_t k = seg_begin_[index]; k < seg_begin_[index + 1]; ++k) {
      const Segment& s = segments_[k];
      plan_.dests[s.dest].device->copy_from_host(plan_.dests[s.dest].base + s.dest_offset,
                                                  staging + s.chunk_offset, s.length, id);
    }
    InFlight f{buffer, {}, index};
    f.tokens.reserve(staging_devices_.size());
    for (int d : staging_devices_) f.tokens.push_back(plan_.dests[d].device->record(id));
    if (options_.progress) {  // consumers may wait for these copies on the device from now on
      std::vector<Progress::Queued> queued;
      for (size_t k = 0; k < staging_devices_.size(); ++k)
        queued.push_back(Progress::Queued{plan_.dests[staging_devices_[k]].device, id, f.tokens[k]});
      options_.progress->queue(index, std::move(queued));
    }
    in_flight.push_back(std::move(f));
  } catch (...) {
    drain(id);  // copies of the chunk's earlier segments may still read the buffer
    pool_->release(buffer);
    throw;
  }
  staged_++;
  bytes_ += c.length;
}

void Run::worker(int id) {
  std::deque<InFlight> in_flight;
  Scratch scratch;
  try {
    while (!cancel_.load()) {
      size_t index = next_.fetch_add(1);
      if (index >= plan_.chunks.size()) break;
      process_chunk(id, index, in_flight, scratch);
    }
    if (pool_) release_in_flight(id, in_flight, 0);
  } catch (...) {
    fail(std::current_exception());
    if (pool_) abandon_in_flight(id, in_flight);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_--;
  }
  done_cv_.notify_all();
}

LoadStats Run::execute(const std::function<bool()>& interrupted) {
  auto t0 = std::chrono::steady_clock::now();
  validate_and_open();

  int threads = std::max(1, std::min<int>(options_.num_threads,
                                          static_cast<int>(std::max<size_t>(1, plan_.chunks.size()))));
  bool need_staging = false;
  uint64_t max_len = 0;
  double alloc_before = 0;
  for (size_t i = 0; i < plan_.chunks.size(); ++i) {
    if (!chunk_is_direct(i) && options_.io_mode == IoMode::kMapped && seg_begin_[i + 1] > seg_begin_[i])
      throw Error(ErrorKind::kFormat, "mapped loads need every chunk mapped whole into host memory");
    if (chunk_is_staged(i)) {
      need_staging = true;
      max_len = std::max(max_len, plan_.chunks[i].length);
      for (size_t k = seg_begin_[i]; k < seg_begin_[i + 1]; ++k) {
        int d = segments_[k].dest;
        if (std::find(staging_devices_.begin(), staging_devices_.end(), d) == staging_devices_.end())
          staging_devices_.push_back(d);
      }
    }
  }
  for (const auto& d : plan_.dests) {
    d.device->begin(threads);
    if (d.device->host_addressable() && options_.io_mode != IoMode::kMapped)
      d.device->prepare_destination(d.base, d.size);
  }
  if (need_staging) {
    // Staging memory suits the first staging device that is not host memory (page-locked for a
    // GPU: also fine for memcpy to host destinations); cached per process.
    std::string kind = "host";
    HostAllocator alloc = allocate_aligned_host;
    for (int d : staging_devices_) {
      const auto& dev = plan_.dests[d].device;
      if (!dev->host_addressable()) {
        kind = dev->name();
        alloc = dev->staging_allocator();
        break;
      }
    }
    size_t count = static_cast<size_t>(threads) * std::max(1, options_.buffers_per_thread);
    lease_ = lease_pool(kind, count, std::max<uint64_t>(max_len, kDirectAlignment), alloc);
    pool_ = &**lease_;
    alloc_before = pool_->alloc_seconds();
  }

  bool was_interrupted = false;
  {
    ThreadGroup group;
    running_ = threads;
    try {
      for (int i = 0; i < threads; ++i) group.spawn([this, i] { worker(i); });
    } catch (...) {
      fail(std::current_exception());  // the workers started stop; the group joins them
      throw;
    }
    std::unique_lock<std::mutex> lock(mu_);
    while (running_ > 0) {
      done_cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return running_ == 0; });
      if (running_ > 0 && !was_interrupted) {
        lock.unlock();
        if ((interrupted && interrupted()) || (options_.progress && options_.progress->cancelled())) {
          was_interrupted = true;
          cancel_.store(true);
          if (pool_) pool_->cancel();
        }
        lock.lock();
      }
    }
  }  // workers joined
  for (const auto& d : plan_.dests) {
    try {
      d.device->synchronize();
    } catch (...) {
      if (!error_) error_ = std::current_exception();
    }
  }
  if (error_) std::rethrow_exception(error_);
  if (was_interrupted) throw Error(ErrorKind::kCancelled, "load interrupted");

  LoadStats stats;
  stats.bytes_read = bytes_.load();
  stats.chunks_direct = direct_.load();
  stats.chunks_staged = staged_.load();
  stats.chunks_verified = verified_.load();
  stats.threads = threads;
  for (const auto& r : readers_) stats.direct_reads += r->direct_reads();
  stats.o_direct_used = stats.direct_reads > 0;
  if (pool_) stats.staging_alloc_seconds = pool_->alloc_seconds() - alloc_before;
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace

LoadStats run_load(const LoadPlan& plan, const LoadOptions& options,
                   const std::function<bool()>& interrupted) {
  Run run(plan, options);
  return run.execute(interrupted);
}

}  // namespace sllm
