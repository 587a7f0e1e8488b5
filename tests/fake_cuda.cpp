// A CPU stand-in for the CUDA driver (libcuda.so.1), for tests only, that behaves like a GPU.
//
// Built by the `fake_libcuda` fixture (tests/conftest.py) and loaded through SLLM_STORE_LIBCUDA, it
// runs the GPU code paths of the C++ core on a machine without a GPU. "Device memory" is host
// memory: a device pointer is a host address.
//
// Model:
// - Streams are asynchronous. Each stream (cuStreamCreate) has a worker thread that runs its queued
//   operations in FIFO order, each after a small lag (FAKE_CUDA_LAG_US). A copy reads its source
//   when it runs, so a source overwritten before that corrupts the destination, as on a GPU.
//   cuEventRecord queues a marker; an event tracks its latest record and completes when the worker
//   reaches it. cuStreamWaitEvent queues a wait for the event's latest record at the time of the
//   call (an event of any context; none recorded: no wait). cuStreamSynchronize / cuEventSynchronize block. cuStreamDestroy_v2 lets the queued
//   work run, then joins the worker. The NULL (default) stream is not modelled (400).
// - Only page-locked host memory (cuMemHostAlloc, cuMemHostRegister_v2) is copied asynchronously.
//   A copy to or from other (pageable) host memory is queued like any other, but the call returns
//   only once it has run (the driver stages pageable memory). A device-to-device copy
//   (cuMemcpyDtoDAsync_v2) has no host side: it always returns at once.
// - Contexts: one primary context per device, with a stable handle per device, reference counted
//   (cuDevicePrimaryCtxRetain / cuDevicePrimaryCtxRelease_v2). When the last reference goes, the
//   work queued on its streams completes and the context is destroyed with the page-locked memory
//   allocated under it (memory registered under it is pageable again); a later retain makes a new
//   one. The current context is per thread. Calls that need a context (stream and event creation
//   and use, copies, cuMemHostAlloc, cuMemFreeHost, cuMemHostRegister_v2, cuMemHostUnregister,
//   cuIpc*, cuMemCreate, cuMemAddressReserve, cuMemMap, cuMemSetAccess, cuMemExportToShareableHandle,
//   cuMemImportFromShareableHandle, cuMemGetInfo_v2) fail with CUDA_ERROR_INVALID_CONTEXT (201) when
//   none is current (or its context is not alive), and a stream or event used while another context
//   is current fails with 201 too. Stream and event destruction, the pointer queries, the device
//   queries, cuMemRelease, cuMemUnmap and cuMemAddressFree need no current context.
// - Failures arrive late and stick: a failing copy (FAKE_CUDA_FAIL_COPY) is queued successfully;
//   when it runs, its context enters the sticky error CUDA_ERROR_ILLEGAL_ADDRESS (700), reported by
//   the synchronize calls that cover it and by every later call under that context (work still
//   queued in that context is dropped, as on a faulted GPU, so memory it would have read may be
//   freed). Context management calls still work; only a new context (after the last release) is
//   free of the error. Under a faulted context cuMemFreeHost and cuMemHostUnregister return 700
//   and leave the memory as it is, until the context is destroyed.
// - Misuse that a GPU would punish with corruption or a crash prints one line
//   "FAKE CUDA MISUSE: ..." on stderr, is counted, and aborts the process (FAKE_CUDA_MISUSE=count:
//   only counted; the call then fails and changes nothing). Misuse is: freeing (cuMemFreeHost) or
//   unregistering (cuMemHostUnregister) memory that a queued copy has not finished with; freeing or
//   unregistering memory that is not page-locked (or twice); using memory allocated under a
//   destroyed context, or unregistering memory registered under one; using a stream or an event of
//   a destroyed context; using a destroyed stream or event; releasing a primary context without a
//   reference; closing an IPC mapping that is not open; releasing (cuMemRelease) a handle that is
//   not one or was released already; unmapping (cuMemUnmap) a range that is not exactly a run of
//   mapped ranges; freeing (cuMemAddressFree) a range that was not reserved as such, or that still
//   has memory mapped in it.
// - IPC and address ranges: tests declare "device allocations" with fake_add_device_range (and
//   cuMemSetAccess declares the ranges it makes accessible); cuMemGetAddressRange_v2 and cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, always
//   device 0) answer for them, cuIpcGetMemHandle exports them (64 bytes: pid, base, size), and
//   cuIpcOpenMemHandle_v2 opens such a handle in the process that made it (elsewhere: 1, invalid
//   value, since another process's memory is out of reach).
// - Virtual memory management, shared between processes as on a GPU. cuMemCreate makes a memfd of
//   the size asked for (a multiple of the 2 MiB granularity that cuMemGetAllocationGranularity
//   gives, else 1); its handle is an id in a registry (never reused) holding the memfd.
//   cuMemAddressReserve reserves inaccessible address space (aligned to the granularity unless
//   told otherwise); cuMemMap maps the memfd there (shared, inaccessible until cuMemSetAccess);
//   cuMemSetAccess makes it readable (CU_MEM_ACCESS_FLAGS_PROT_READ) or readable and writable
//   (PROT_READWRITE) with mprotect, for every device at once (one address space serves them all:
//   the widest access asked for wins), and declares each mapped range a device allocation (see
//   the pointer queries below). cuMemUnmap puts inaccessible reserved space back; cuMemAddressFree
//   gives the reservation back. cuMemRelease closes the registry's memfd: the memory lives on while
//   mapped, as in CUDA. cuMemExportToShareableHandle (POSIX file descriptors only, and only for
//   allocations that requested them: 801 otherwise) returns a duplicate of the memfd, which another
//   process imports with cuMemImportFromShareableHandle (its own duplicate; the size from fstat):
//   both then map the same pages, so writes on either side are seen on the other. A write through a
//   read-only mapping (from the host, or by a copy's worker thread) faults: the process dies of
//   SIGSEGV, the fake's form of the GPU's illegal-address error in that case. The bytes of live
//   cuMemCreate allocations (released and unmapped: gone; imported ones do not count) may not exceed
//   FAKE_CUDA_DEVICE_MEMORY (cuMemCreate: 2, out of memory); cuMemGetInfo_v2 reports that limit as
//   the total and what is left of it as free. cuDeviceGetAttribute answers 1 for
//   CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED (102) and
//   CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED (103) (0 with FAKE_CUDA_NO_VMM=1,
//   although the entry points still work), 0 for every other attribute.
// Streams and events are never freed (a destroyed stream's worker is joined), so that a late use of
// a destroyed one is reported instead of reading freed memory; the registry of allocations is never
// destroyed either, so that workers still running at process exit never touch destroyed state.
//
// Environment (read when used):
//   FAKE_CUDA_DEVICES=N            number of devices (default 1, at most 8)
//   FAKE_CUDA_LAG_US=N             each queued operation runs N microseconds after its worker reaches
//                                  it (default 200)
//   FAKE_CUDA_COPY_MS=N            every copy takes N ms more, in the worker
//   FAKE_CUDA_FAIL_COPY=N          the N-th host-to-device copy (1-based, process-wide) fails when it
//                                  runs: sticky error 700 in its context
//   FAKE_CUDA_FAIL_COPY_BACK=1     every device-to-host copy fails at once (700, not sticky)
//   FAKE_CUDA_FLIP_COPY_BACK=1     every device-to-host copy flips a bit of what it copies
//   FAKE_CUDA_NO_HOST_ALLOC=1      page-locking (cuMemHostAlloc, cuMemHostRegister_v2) always fails (2,
//                                  out of memory)
//   FAKE_CUDA_FAIL_HOST_ALLOC=N    the N-th page-locking (1-based) fails (2) after
//   FAKE_CUDA_ALLOC_DELAY_MS=N     N ms (default 20), overlapping other allocations
//   FAKE_CUDA_FAIL_ADDRESS_RANGE=1 cuMemGetAddressRange_v2 always fails (500)
//   FAKE_CUDA_MISUSE=count         misuse is counted, not fatal
//   FAKE_CUDA_DEVICE_MEMORY=N      bytes of device memory for cuMemCreate (default 80 GiB)
//   FAKE_CUDA_NO_VMM=1             the devices report no virtual memory management support
//   FAKE_CUDA_NO_READ_ONLY=1       cuMemSetAccess refuses read-only access (1, invalid value)
//
// Exported for tests (extern "C"):
//   unsigned fake_last_event_flags()  flags of the last cuEventCreate (~0u before any)
//   long fake_copies_back()           device-to-host copies asked for so far
//   long fake_misuse_count()          misuse reported so far
//   long fake_pending_operations()    operations queued on all streams and not finished yet
//   void* fake_current_context()      the calling thread's current context (NULL: none)
//   int fake_live_contexts()          primary contexts alive (with references)
//   long fake_pinned_bytes()          bytes of cuMemHostAlloc memory neither freed nor destroyed
//   void fake_add_device_range(unsigned long long ptr, size_t size)   declares a device allocation
//   void fake_remove_device_range(unsigned long long ptr)            forgets the one based at ptr
//   long fake_vmm_bytes()             bytes of live cuMemCreate allocations
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace {

using CUresult = int;
constexpr CUresult kOk = 0;
constexpr CUresult kInvalidValue = 1;
constexpr CUresult kOutOfMemory = 2;
constexpr CUresult kInvalidDevice = 101;
constexpr CUresult kInvalidContext = 201;
constexpr CUresult kAlreadyMapped = 208;
constexpr CUresult kInvalidHandle = 400;
constexpr CUresult kNotFound = 500;
constexpr CUresult kIllegalAddress = 700;
constexpr CUresult kAlreadyRegistered = 712;
constexpr CUresult kNotSupported = 801;
constexpr int kMaxDevices = 8;
constexpr int kPointerAttributeDeviceOrdinal = 9;  // CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
constexpr size_t kPage = 4096;
constexpr size_t kGranularity = 2u << 20;  // of cuMemCreate sizes and mapped ranges
constexpr int kAttributeVmmSupported = 102;  // CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
constexpr int kAttributePosixFdSupported = 103;  // CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
constexpr int kHandleTypePosixFd = 1;  // CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

int device_count() {
  int n = env_int("FAKE_CUDA_DEVICES", 1);
  return n < 0 ? 0 : (n > kMaxDevices ? kMaxDevices : n);
}

std::atomic<long> g_misuse{0};

// Reports misuse: one line on stderr, counted; aborts unless FAKE_CUDA_MISUSE=count.
void misuse(const char* fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  g_misuse++;
  std::fprintf(stderr, "FAKE CUDA MISUSE: %s\n", msg);
  std::fflush(stderr);
  const char* mode = std::getenv("FAKE_CUDA_MISUSE");
  if (!(mode && std::strcmp(mode, "count") == 0)) std::abort();
}

// Runs an entry point's body; nothing thrown crosses the C boundary (only allocation can throw).
template <class F>
CUresult guarded(F&& body) noexcept {
  try {
    return body();
  } catch (...) {
    return kOutOfMemory;
  }
}

// One lifetime of a device's primary context, from the retain that made it to the release that
// destroyed it. Never freed: streams, events and allocations made under it keep pointing at it.
struct Life {
  int device;
  std::atomic<CUresult> sticky{kOk};  // the sticky error, once a copy failed
  std::atomic<bool> dead{false};
  explicit Life(int d) : device(d) {}
};

// A device's primary context handle: stable for the process, as in CUDA.
struct Context {
  int device = 0;
  int refs = 0;          // guarded by Registry::mu
  Life* life = nullptr;  // while refs > 0; guarded by Registry::mu
};

struct Pinned {  // page-locked host memory
  size_t size;
  Life* life;  // the context it was allocated or registered under
  bool registered;
};

struct Pending {  // host memory that a queued copy has not finished with
  uintptr_t start;
  size_t size;
  Life* life;
};

// A cuMemCreate allocation or an imported one (cuMemImportFromShareableHandle): a memfd.
struct VmmHandle {
  int fd;               // -1 once released
  size_t size;
  bool created;         // by cuMemCreate in this process (counted against FAKE_CUDA_DEVICE_MEMORY)
  int handle_types;     // the shareable handle types it may be exported as
  int maps = 0;         // mapped ranges backed by it
  bool counted = false; // its bytes are in Registry::vmm_bytes
};

struct VmmMap {  // a range mapped with cuMemMap
  size_t size;
  uint64_t handle;
};

struct Stream;

struct Registry {
  std::mutex mu;  // guards everything below, and Context::refs / Context::life
  Context contexts[kMaxDevices];
  std::map<uintptr_t, Pinned> pinned;          // base -> allocation or registration
  std::map<uintptr_t, int> dead_registrations; // base -> device, of registrations destroyed with it
  std::map<uintptr_t, size_t> device_ranges;   // declared "device allocations": base -> size
  std::map<uintptr_t, long> ipc_open;          // opened IPC mappings: base -> times opened
  std::map<uint64_t, Pending> pending;         // by id (Op::pending)
  uint64_t next_pending = 1;
  std::set<Stream*> streams;                   // streams not destroyed
  long pinned_bytes = 0;                       // cuMemHostAlloc bytes neither freed nor destroyed
  std::map<uint64_t, VmmHandle> vmm_handles;   // by handle; entries are kept once released
  uint64_t next_vmm_handle = 0x1000;           // handles are never reused
  std::map<uintptr_t, size_t> reservations;    // cuMemAddressReserve ranges: base -> size
  std::map<uintptr_t, VmmMap> vmm_maps;        // cuMemMap ranges: base -> mapping
  unsigned long long vmm_bytes = 0;            // live cuMemCreate bytes (released and unmapped: gone)

  Registry() {
    for (int i = 0; i < kMaxDevices; ++i) contexts[i].device = i;
  }
};

// Never destroyed: worker threads may still run while the process exits.
Registry& reg() {
  static Registry* r = new Registry();
  return *r;
}

thread_local Context* t_current = nullptr;

std::atomic<long> g_pending_ops{0};
std::atomic<long> g_h2d{0}, g_copies_back{0}, g_host_allocs{0};
std::atomic<unsigned> g_event_flags{~0u};

// The context the calling thread works under: its current one, alive and (unless `any_error`)
// free of a sticky error.
CUresult current(Life** out, bool any_error = false) {
  Context* c = t_current;
  if (c == nullptr) return kInvalidContext;
  Life* life;
  {
    std::lock_guard<std::mutex> lock(reg().mu);
    life = c->life;
  }
  if (life == nullptr) return kInvalidContext;
  if (!any_error)
    if (CUresult s = life->sticky.load()) return s;
  *out = life;
  return kOk;
}

// The page-locked allocation holding all of [p, p+n), or nullptr. Caller holds reg().mu.
Pinned* find_pinned(const void* p, size_t n) {
  auto& pinned = reg().pinned;
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = pinned.upper_bound(a);
  if (it == pinned.begin()) return nullptr;
  --it;
  return a + n <= it->first + it->second.size ? &it->second : nullptr;
}

// True when a queued copy that will still run uses [base, base+size). Caller holds reg().mu.
bool pending_overlaps(uintptr_t base, size_t size) {
  for (const auto& [id, p] : reg().pending)
    if (p.start < base + size && base < p.start + p.size && p.life->sticky.load() == kOk) return true;
  return false;
}

struct Stream;

struct Op {
  bool copy = false;  // false: an event's marker, or a wait
  Stream* after = nullptr;  // a wait (cuStreamWaitEvent): until operation `after_seq` of `after` has run
  uint64_t after_seq = 0;
  void* dst = nullptr;
  const void* src = nullptr;
  size_t n = 0;
  bool fail = false;      // fails when it runs (FAKE_CUDA_FAIL_COPY)
  bool flip = false;      // flips a bit of what it copies (FAKE_CUDA_FLIP_COPY_BACK)
  uint64_t pending = 0;   // its entry in Registry::pending (page-locked host side), 0: none
};

struct Stream {
  Life* const life;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Op> queue;               // queue.front() is running or next
  uint64_t enqueued = 0, done = 0;    // operations queued and finished so far
  bool stopping = false;              // destroyed: the worker ends once the queue is empty
  std::atomic<bool> destroyed{false};
  std::thread worker;

  explicit Stream(Life* l) : life(l) {}

  void run() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return stopping || !queue.empty(); });
      if (queue.empty()) return;
      Op op = queue.front();
      lock.unlock();
      execute(op);
      lock.lock();
      queue.pop_front();
      ++done;
      g_pending_ops--;
      cv.notify_all();
    }
  }

  void execute(const Op& op) {
    if (int lag = env_int("FAKE_CUDA_LAG_US", 200); lag > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(lag));
    if (op.after != nullptr) op.after->wait_for(op.after_seq);
    if (!op.copy) return;
    if (int ms = env_int("FAKE_CUDA_COPY_MS", 0); ms > 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    if (op.fail) {
      CUresult expected = kOk;
      life->sticky.compare_exchange_strong(expected, kIllegalAddress);
    } else if (life->sticky.load() == kOk) {  // a faulted context runs nothing more
      std::memcpy(op.dst, op.src, op.n);
      if (op.flip && op.n) static_cast<unsigned char*>(op.dst)[op.n / 2] ^= 1;
    }
    if (op.pending) {
      std::lock_guard<std::mutex> lock(reg().mu);
      reg().pending.erase(op.pending);
    }
  }

  // Queues op and sets *seq to its number; false once the stream is being destroyed.
  bool push(const Op& op, uint64_t* seq) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (stopping) return false;
      queue.push_back(op);
      *seq = ++enqueued;
      g_pending_ops++;
    }
    cv.notify_all();
    return true;
  }

  uint64_t last() {
    std::lock_guard<std::mutex> lock(mu);
    return enqueued;
  }

  // Blocks until operation `seq` has run; the context's sticky error, if any.
  CUresult wait_for(uint64_t seq) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done >= seq; });
    return life->sticky.load();
  }
};

struct Event {
  Life* const life;
  std::mutex mu;
  Stream* stream = nullptr;  // of the latest record (nullptr: never recorded)
  uint64_t seq = 0;          // the latest record's marker in it
  std::atomic<bool> destroyed{false};
  explicit Event(Life* l) : life(l) {}
};

// The stream behind handle s, usable by the calling thread.
CUresult use_stream(void* s, const char* call, Stream** out) {
  Stream* st = static_cast<Stream*>(s);
  if (st == nullptr) return kInvalidHandle;
  if (st->destroyed.load()) {
    misuse("%s on stream %p, which was destroyed", call, s);
    return kInvalidHandle;
  }
  if (st->life->dead.load()) {
    misuse("%s on stream %p, whose context (device %d) was destroyed", call, s, st->life->device);
    return kInvalidContext;
  }
  Life* life = nullptr;
  if (CUresult r = current(&life)) return r;
  if (life != st->life) return kInvalidContext;
  *out = st;
  return kOk;
}

CUresult use_event(void* e, const char* call, Event** out) {
  Event* ev = static_cast<Event*>(e);
  if (ev == nullptr) return kInvalidHandle;
  if (ev->destroyed.load()) {
    misuse("%s on event %p, which was destroyed", call, e);
    return kInvalidHandle;
  }
  if (ev->life->dead.load()) {
    misuse("%s on event %p, whose context (device %d) was destroyed", call, e, ev->life->device);
    return kInvalidContext;
  }
  Life* life = nullptr;
  if (CUresult r = current(&life)) return r;
  if (life != ev->life) return kInvalidContext;
  *out = ev;
  return kOk;
}

// The device memory of each device (FAKE_CUDA_DEVICE_MEMORY, else 80 GiB).
unsigned long long device_memory() {
  const char* v = std::getenv("FAKE_CUDA_DEVICE_MEMORY");
  return v && *v ? std::strtoull(v, nullptr, 10) : 80ull << 30;
}

// Drops a released allocation's bytes once nothing maps it any more. Caller holds reg().mu.
void settle(VmmHandle& h) {
  if (h.counted && h.fd < 0 && h.maps == 0) {
    reg().vmm_bytes -= h.size;
    h.counted = false;
  }
}

// The mappings that cover [ptr, ptr+size) exactly, one after another, or none. Caller holds
// reg().mu.
std::vector<std::map<uintptr_t, VmmMap>::iterator> mappings_of(uintptr_t ptr, size_t size) {
  std::vector<std::map<uintptr_t, VmmMap>::iterator> out;
  auto& maps = reg().vmm_maps;
  uintptr_t at = ptr;
  for (auto it = maps.find(ptr); it != maps.end() && it->first == at && at < ptr + size; ++it) {
    out.push_back(it);
    at += it->second.size;
  }
  if (size == 0 || at != ptr + size) out.clear();
  return out;
}

enum class Direction { kToDevice, kToHost, kDeviceToDevice };

// cuMemcpyHtoDAsync_v2 / cuMemcpyDtoHAsync_v2 / cuMemcpyDtoDAsync_v2: queued on the stream; returns
// at once when the host side is page-locked (or there is none), else once the copy has run.
CUresult copy(void* dst, const void* src, size_t n, void* s, Direction dir, const char* call) {
  Stream* st = nullptr;
  if (CUresult r = use_stream(s, call, &st)) return r;
  if (n > 0 && (dst == nullptr || src == nullptr)) return kInvalidValue;
  const bool to_device = dir == Direction::kToDevice;
  const void* host = dir == Direction::kDeviceToDevice ? nullptr : (to_device ? src : dst);
  Op op;
  op.copy = true;
  op.dst = dst;
  op.src = src;
  op.n = n;
  bool page_locked = host == nullptr;
  if (host != nullptr) {
    std::lock_guard<std::mutex> lock(reg().mu);
    if (Pinned* p = n ? find_pinned(host, n) : nullptr) {
      if (p->life->dead.load()) {
        misuse("%s with host memory %p, page-locked under a context (device %d) that was destroyed", call,
               host, p->life->device);
        return kInvalidValue;
      }
      page_locked = true;
      op.pending = reg().next_pending++;
      reg().pending[op.pending] = Pending{reinterpret_cast<uintptr_t>(host), n, st->life};
    }
  }
  if (dir == Direction::kToDevice) {
    op.fail = ++g_h2d == env_int("FAKE_CUDA_FAIL_COPY", 0);
  } else if (dir == Direction::kToHost) {
    ++g_copies_back;
    op.flip = env_int("FAKE_CUDA_FLIP_COPY_BACK", 0) != 0;
  }
  const bool fail_now = dir == Direction::kToHost && env_int("FAKE_CUDA_FAIL_COPY_BACK", 0) != 0;
  uint64_t seq = 0;
  if (fail_now || !st->push(op, &seq)) {
    if (op.pending) {
      std::lock_guard<std::mutex> lock(reg().mu);
      reg().pending.erase(op.pending);
    }
    if (fail_now) return kIllegalAddress;
    misuse("%s on stream %p while it is being destroyed", call, s);
    return kInvalidHandle;
  }
  // Pageable memory: read (or written) before returning, and a fault says so.
  return page_locked ? kOk : st->wait_for(seq);
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return kOk; }

CUresult cuDeviceGetCount(int* n) {
  if (n == nullptr) return kInvalidValue;
  *n = device_count();
  return kOk;
}

CUresult cuDeviceGet(int* dev, int ordinal) {
  if (dev == nullptr) return kInvalidValue;
  if (ordinal < 0 || ordinal >= device_count()) return kInvalidDevice;
  *dev = ordinal;
  return kOk;
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  return guarded([&] {
    if (ctx == nullptr) return kInvalidValue;
    if (dev < 0 || dev >= device_count()) return kInvalidDevice;
    std::lock_guard<std::mutex> lock(reg().mu);
    Context& c = reg().contexts[dev];
    if (c.refs == 0) c.life = new Life(dev);
    c.refs++;
    *ctx = &c;
    return kOk;
  });
}

CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
  return guarded([&] {
    if (dev < 0 || dev >= device_count()) return kInvalidDevice;
    Registry& r = reg();
    std::vector<Stream*> streams;  // of the context being destroyed
    {
      std::lock_guard<std::mutex> lock(r.mu);
      Context& c = r.contexts[dev];
      if (c.refs == 0) {
        misuse("cuDevicePrimaryCtxRelease of device %d, whose primary context has no reference", dev);
        return kInvalidContext;
      }
      if (--c.refs > 0) return kOk;
      Life* dying = c.life;
      c.life = nullptr;
      dying->dead.store(true);  // with its page-locked memory, streams and events
      for (auto it = r.pinned.begin(); it != r.pinned.end();) {
        if (it->second.life != dying) {
          ++it;
        } else if (it->second.registered) {  // registered memory is the caller's: pageable again
          r.dead_registrations[it->first] = dev;
          it = r.pinned.erase(it);
        } else {  // allocated memory is gone (kept here, so that a later use is reported)
          r.pinned_bytes -= static_cast<long>(it->second.size);
          ++it;
        }
      }
      for (Stream* st : r.streams)
        if (st->life == dying) streams.push_back(st);
    }
    for (Stream* st : streams) st->wait_for(st->last());  // work already queued completes
    return kOk;
  });
}

CUresult cuCtxSetCurrent(void* ctx) {
  Context* c = static_cast<Context*>(ctx);
  Context* first = reg().contexts;
  if (c != nullptr && (c < first || c >= first + kMaxDevices)) return kInvalidContext;
  t_current = c;  // a handle whose context is not alive is accepted; calls under it fail with 201
  return kOk;
}

CUresult cuCtxGetCurrent(void** ctx) {
  if (ctx == nullptr) return kInvalidValue;
  *ctx = t_current;
  return kOk;
}

CUresult cuStreamCreate(void** s, unsigned) {
  return guarded([&] {
    if (s == nullptr) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    Stream* st = new Stream(life);
    try {
      st->worker = std::thread([st] { st->run(); });
    } catch (...) {
      delete st;
      return kOutOfMemory;
    }
    std::lock_guard<std::mutex> lock(reg().mu);
    reg().streams.insert(st);
    *s = st;
    return kOk;
  });
}

CUresult cuStreamDestroy_v2(void* s) {
  return guarded([&] {
    Stream* st = static_cast<Stream*>(s);
    if (st == nullptr) return kInvalidHandle;
    if (st->destroyed.exchange(true)) {
      misuse("cuStreamDestroy of stream %p, which was destroyed already", s);
      return kInvalidHandle;
    }
    const bool dead = st->life->dead.load();
    if (dead)
      misuse("cuStreamDestroy of stream %p, whose context (device %d) was destroyed", s, st->life->device);
    {
      std::lock_guard<std::mutex> lock(st->mu);
      st->stopping = true;  // what is queued still runs, as with CUDA
    }
    st->cv.notify_all();
    st->worker.join();
    {
      std::lock_guard<std::mutex> lock(reg().mu);
      reg().streams.erase(st);
    }
    return dead ? kInvalidContext : st->life->sticky.load();
  });
}

CUresult cuStreamSynchronize(void* s) {
  return guarded([&] {
    Stream* st = nullptr;
    if (CUresult r = use_stream(s, "cuStreamSynchronize", &st)) return r;
    return st->wait_for(st->last());
  });
}

CUresult cuEventCreate(void** e, unsigned flags) {
  return guarded([&] {
    if (e == nullptr) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    g_event_flags = flags;
    *e = new Event(life);
    return kOk;
  });
}

CUresult cuEventDestroy_v2(void* e) {
  Event* ev = static_cast<Event*>(e);
  if (ev == nullptr) return kInvalidHandle;
  if (ev->destroyed.exchange(true)) {
    misuse("cuEventDestroy of event %p, which was destroyed already", e);
    return kInvalidHandle;
  }
  if (ev->life->dead.load()) {
    misuse("cuEventDestroy of event %p, whose context (device %d) was destroyed", e, ev->life->device);
    return kInvalidContext;
  }
  return ev->life->sticky.load();
}

CUresult cuEventRecord(void* e, void* s) {
  return guarded([&] {
    Event* ev = nullptr;
    Stream* st = nullptr;
    if (CUresult r = use_event(e, "cuEventRecord", &ev)) return r;
    if (CUresult r = use_stream(s, "cuEventRecord", &st)) return r;
    std::lock_guard<std::mutex> lock(ev->mu);  // concurrent records: the later one is the latest
    uint64_t seq = 0;
    if (!st->push(Op{}, &seq)) {
      misuse("cuEventRecord on stream %p while it is being destroyed", s);
      return kInvalidHandle;
    }
    ev->stream = st;
    ev->seq = seq;
    return kOk;
  });
}

CUresult cuEventSynchronize(void* e) {
  return guarded([&] {
    Event* ev = nullptr;
    if (CUresult r = use_event(e, "cuEventSynchronize", &ev)) return r;
    Stream* st;
    uint64_t seq;
    {
      std::lock_guard<std::mutex> lock(ev->mu);
      st = ev->stream;
      seq = ev->seq;
    }
    return st ? st->wait_for(seq) : ev->life->sticky.load();
  });
}

CUresult cuStreamWaitEvent(void* s, void* e, unsigned flags) {
  return guarded([&] {
    if (flags != 0) return kInvalidValue;
    Stream* st = nullptr;
    if (CUresult r = use_stream(s, "cuStreamWaitEvent", &st)) return r;
    Event* ev = static_cast<Event*>(e);  // may be of another context, as on a GPU
    if (ev == nullptr) return kInvalidHandle;
    if (ev->destroyed.load()) {
      misuse("cuStreamWaitEvent on event %p, which was destroyed", e);
      return kInvalidHandle;
    }
    Op op;
    {
      std::lock_guard<std::mutex> lock(ev->mu);  // the latest record at the time of the call
      op.after = ev->stream;
      op.after_seq = ev->seq;
    }
    if (op.after == st) return kOk;  // the stream's own order covers it
    uint64_t seq = 0;
    if (!st->push(op, &seq)) {
      misuse("cuStreamWaitEvent on stream %p while it is being destroyed", s);
      return kInvalidHandle;
    }
    return kOk;
  });
}

CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t n, void* s) {
  return guarded(
      [&] { return copy(reinterpret_cast<void*>(dst), src, n, s, Direction::kToDevice, "cuMemcpyHtoDAsync"); });
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t n, void* s) {
  return guarded(
      [&] { return copy(dst, reinterpret_cast<const void*>(src), n, s, Direction::kToHost, "cuMemcpyDtoHAsync"); });
}

// The injected failures of page-locking (FAKE_CUDA_NO_HOST_ALLOC, FAKE_CUDA_FAIL_HOST_ALLOC), shared
// by cuMemHostAlloc and cuMemHostRegister_v2.
static CUresult host_alloc_fault() {
  if (env_int("FAKE_CUDA_NO_HOST_ALLOC", 0)) return kOutOfMemory;
  if (int fail = env_int("FAKE_CUDA_FAIL_HOST_ALLOC", 0)) {
    if (++g_host_allocs == fail) {
      std::this_thread::sleep_for(std::chrono::milliseconds(env_int("FAKE_CUDA_ALLOC_DELAY_MS", 20)));
      return kOutOfMemory;
    }
  }
  return kOk;
}

CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
  return guarded([&] {
    if (p == nullptr) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    if (CUresult r = host_alloc_fault()) return r;
    size_t size = ((n ? n : 1) + kPage - 1) / kPage * kPage;
    void* m = std::aligned_alloc(kPage, size);
    if (m == nullptr) return kOutOfMemory;
    std::lock_guard<std::mutex> lock(reg().mu);
    reg().pinned[reinterpret_cast<uintptr_t>(m)] = Pinned{n, life, false};
    reg().pinned_bytes += static_cast<long>(n);
    *p = m;
    return kOk;
  });
}

CUresult cuMemFreeHost(void* p) {
  return guarded([&] {
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    std::lock_guard<std::mutex> lock(reg().mu);
    auto it = reg().pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == reg().pinned.end() || it->second.registered) {
      misuse("cuMemFreeHost(%p): not memory from cuMemHostAlloc, or freed already", p);
      return kInvalidValue;
    }
    if (it->second.life->dead.load()) {
      misuse("cuMemFreeHost(%p): its context (device %d) was destroyed, and the memory with it", p,
             it->second.life->device);
      return kInvalidContext;
    }
    if (pending_overlaps(it->first, it->second.size)) {
      misuse("cuMemFreeHost(%p): a queued copy has not finished with this memory yet", p);
      return kInvalidValue;
    }
    reg().pinned_bytes -= static_cast<long>(it->second.size);
    reg().pinned.erase(it);
    std::free(p);
    return kOk;
  });
}

CUresult cuMemHostRegister_v2(void* p, size_t n, unsigned) {
  return guarded([&] {
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    if (p == nullptr || n == 0) return kInvalidValue;
    if (CUresult r = host_alloc_fault()) return r;
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(reg().mu);
    auto& pinned = reg().pinned;
    auto& dead = reg().dead_registrations;
    dead.erase(dead.lower_bound(a), dead.lower_bound(a + n));
    auto next = pinned.lower_bound(a);
    if (next != pinned.end() && next->first < a + n) return kAlreadyRegistered;
    if (next != pinned.begin() && std::prev(next)->first + std::prev(next)->second.size > a)
      return kAlreadyRegistered;
    pinned[a] = Pinned{n, life, true};
    return kOk;
  });
}

CUresult cuMemHostUnregister(void* p) {
  return guarded([&] {
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    std::lock_guard<std::mutex> lock(reg().mu);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (auto d = reg().dead_registrations.find(a); d != reg().dead_registrations.end()) {
      misuse("cuMemHostUnregister(%p): registered under a context (device %d) that was destroyed", p,
             d->second);
      return kInvalidContext;
    }
    auto it = reg().pinned.find(a);
    if (it == reg().pinned.end() || !it->second.registered) {
      misuse("cuMemHostUnregister(%p): not registered, or unregistered already", p);
      return kInvalidValue;
    }
    if (pending_overlaps(it->first, it->second.size)) {
      misuse("cuMemHostUnregister(%p): a queued copy has not finished with this memory yet", p);
      return kInvalidValue;
    }
    reg().pinned.erase(it);
    return kOk;
  });
}

CUresult cuGetErrorString(CUresult r, const char** s) {
  if (s == nullptr) return kInvalidValue;
  switch (r) {
    case kOk: *s = "no error (fake)"; break;
    case kInvalidValue: *s = "invalid argument (fake)"; break;
    case kOutOfMemory: *s = "out of memory (fake)"; break;
    case kInvalidDevice: *s = "invalid device ordinal (fake)"; break;
    case kInvalidContext: *s = "invalid device context (fake)"; break;
    case kInvalidHandle: *s = "invalid resource handle (fake)"; break;
    case kNotFound: *s = "named symbol not found (fake)"; break;
    case kIllegalAddress: *s = "an illegal memory access was encountered (fake)"; break;
    case kAlreadyRegistered: *s = "part or all of the requested memory range is already mapped (fake)"; break;
    case kAlreadyMapped: *s = "resource already mapped (fake)"; break;
    case kNotSupported: *s = "operation not supported (fake)"; break;
    default: *s = "fake CUDA error"; break;
  }
  return kOk;
}

// IPC: handles of declared device ranges, opened in the process that made them.
struct IpcHandle {
  char reserved[64];
};

CUresult cuMemGetAddressRange_v2(unsigned long long* base, size_t* size, unsigned long long ptr) {
  if (env_int("FAKE_CUDA_FAIL_ADDRESS_RANGE", 0)) return kNotFound;
  std::lock_guard<std::mutex> lock(reg().mu);
  auto& ranges = reg().device_ranges;
  auto it = ranges.upper_bound(ptr);
  if (it == ranges.begin()) return kNotFound;
  --it;
  if (ptr >= it->first + it->second) return kNotFound;
  if (base) *base = it->first;
  if (size) *size = it->second;
  return kOk;
}

CUresult cuIpcGetMemHandle(IpcHandle* h, unsigned long long ptr) {
  if (h == nullptr) return kInvalidValue;
  Life* life = nullptr;
  if (CUresult r = current(&life)) return r;
  unsigned long long base = 0;
  size_t size = 0;
  {
    std::lock_guard<std::mutex> lock(reg().mu);
    auto& ranges = reg().device_ranges;
    auto it = ranges.upper_bound(ptr);
    if (it == ranges.begin() || ptr >= std::prev(it)->first + std::prev(it)->second) return kInvalidValue;
    --it;
    base = it->first;
    size = it->second;
  }
  std::memset(h->reserved, 0, sizeof h->reserved);
  long long pid = ::getpid();
  std::memcpy(h->reserved, &pid, sizeof pid);
  std::memcpy(h->reserved + 8, &base, sizeof base);
  std::memcpy(h->reserved + 16, &size, sizeof size);
  return kOk;
}

CUresult cuIpcOpenMemHandle_v2(unsigned long long* ptr, IpcHandle h, unsigned) {
  return guarded([&] {
    if (ptr == nullptr) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    long long pid = 0;
    unsigned long long base = 0;
    size_t size = 0;
    std::memcpy(&pid, h.reserved, sizeof pid);
    std::memcpy(&base, h.reserved + 8, sizeof base);
    std::memcpy(&size, h.reserved + 16, sizeof size);
    if (pid != ::getpid()) return kInvalidValue;  // another process's memory is out of reach here
    std::lock_guard<std::mutex> lock(reg().mu);
    auto it = reg().device_ranges.find(base);
    if (it == reg().device_ranges.end() || it->second != size) return kInvalidValue;
    reg().ipc_open[base]++;
    *ptr = base;
    return kOk;
  });
}

CUresult cuIpcCloseMemHandle(unsigned long long ptr) {
  Life* life = nullptr;
  if (CUresult r = current(&life)) return r;
  std::lock_guard<std::mutex> lock(reg().mu);
  auto it = reg().ipc_open.find(ptr);
  if (it == reg().ipc_open.end()) {
    misuse("cuIpcCloseMemHandle(0x%llx): no IPC mapping open there", ptr);
    return kInvalidValue;
  }
  if (--it->second == 0) reg().ipc_open.erase(it);
  return kOk;
}

CUresult cuPointerGetAttribute(void* data, int attribute, unsigned long long ptr) {
  if (data == nullptr || attribute != kPointerAttributeDeviceOrdinal) return kInvalidValue;
  {
    std::lock_guard<std::mutex> lock(reg().mu);
    auto& ranges = reg().device_ranges;
    auto it = ranges.upper_bound(ptr);
    if (it == ranges.begin() || ptr >= std::prev(it)->first + std::prev(it)->second) return kInvalidValue;
  }
  *static_cast<int*>(data) = 0;  // declared ranges live on device 0
  return kOk;
}

CUresult cuDeviceGetPCIBusId(char* buf, int len, int dev) {
  if (buf == nullptr || len < 13) return kInvalidValue;
  if (dev < 0 || dev >= device_count()) return kInvalidDevice;
  std::strcpy(buf, "0000:00:00.0");
  buf[9] = static_cast<char>('0' + dev);
  return kOk;
}

CUresult cuDeviceGetByPCIBusId(int* dev, const char* id) {
  if (dev == nullptr || id == nullptr || std::strlen(id) < 12 || id[9] < '0' || id[9] > '9')
    return kInvalidValue;
  int d = id[9] - '0';
  if (d >= device_count()) return kInvalidDevice;
  *dev = d;
  return kOk;
}

// Virtual memory management: allocations are memfds, mapped into reserved address ranges.
struct MemLocation {
  int type;  // 1: device
  int id;
};

struct MemAllocationProp {  // CUmemAllocationProp
  int type;
  int requestedHandleTypes;
  MemLocation location;
  void* win32HandleMetaData;
  unsigned char allocFlags[8];
};

struct MemAccessDesc {  // CUmemAccessDesc
  MemLocation location;
  int flags;
};

CUresult cuDeviceGetAttribute(int* value, int attribute, int dev) {
  if (value == nullptr) return kInvalidValue;
  if (dev < 0 || dev >= device_count()) return kInvalidDevice;
  const bool vmm = env_int("FAKE_CUDA_NO_VMM", 0) == 0;
  *value = (attribute == kAttributeVmmSupported || attribute == kAttributePosixFdSupported) && vmm ? 1 : 0;
  return kOk;
}

CUresult cuMemGetAllocationGranularity(size_t* granularity, const MemAllocationProp* prop, int) {
  if (granularity == nullptr || prop == nullptr) return kInvalidValue;
  *granularity = kGranularity;
  return kOk;
}

CUresult cuMemCreate(unsigned long long* handle, size_t size, const MemAllocationProp* prop,
                     unsigned long long flags) {
  return guarded([&] {
    if (handle == nullptr || prop == nullptr || flags != 0) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    if (prop->type != 1 || prop->location.type != 1) return kInvalidValue;
    if (prop->location.id < 0 || prop->location.id >= device_count()) return kInvalidDevice;
    if (size == 0 || size % kGranularity != 0) return kInvalidValue;
    int fd = ::memfd_create("fake-cuda-vmm", MFD_CLOEXEC);
    if (fd < 0) return kOutOfMemory;
    std::lock_guard<std::mutex> lock(reg().mu);
    if (reg().vmm_bytes + size > device_memory() || ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
      ::close(fd);
      return kOutOfMemory;
    }
    uint64_t id = reg().next_vmm_handle++;
    VmmHandle h{fd, size, true, prop->requestedHandleTypes};
    h.counted = true;
    reg().vmm_handles.emplace(id, h);
    reg().vmm_bytes += size;
    *handle = id;
    return kOk;
  });
}

CUresult cuMemRelease(unsigned long long handle) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(reg().mu);
    auto it = reg().vmm_handles.find(handle);
    if (it == reg().vmm_handles.end() || it->second.fd < 0) {
      misuse("cuMemRelease(0x%llx): not an allocation handle, or released already", handle);
      return kInvalidValue;
    }
    ::close(it->second.fd);  // a mapping keeps the memory (the memfd) alive, as in CUDA
    it->second.fd = -1;
    settle(it->second);
    return kOk;
  });
}

CUresult cuMemAddressReserve(unsigned long long* ptr, size_t size, size_t alignment, unsigned long long,
                             unsigned long long flags) {
  return guarded([&] {
    if (ptr == nullptr || flags != 0 || size == 0 || size % kGranularity != 0) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    const size_t align = alignment ? alignment : kGranularity;
    if ((align & (align - 1)) != 0) return kInvalidValue;
    void* m = ::mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return kOutOfMemory;
    const uintptr_t raw = reinterpret_cast<uintptr_t>(m);
    const uintptr_t base = (raw + align - 1) / align * align;  // the slack on either side goes back
    if (base > raw) ::munmap(m, base - raw);
    ::munmap(reinterpret_cast<void*>(base + size), raw + align - base);  // never empty: base < raw + align
    std::lock_guard<std::mutex> lock(reg().mu);
    reg().reservations[base] = size;
    *ptr = base;
    return kOk;
  });
}

CUresult cuMemAddressFree(unsigned long long ptr, size_t size) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(reg().mu);
    auto it = reg().reservations.find(ptr);
    if (it == reg().reservations.end() || it->second != size) {
      misuse("cuMemAddressFree(0x%llx, %zu): not a reserved address range", ptr, size);
      return kInvalidValue;
    }
    auto& maps = reg().vmm_maps;
    auto inside = maps.lower_bound(ptr);
    if (inside != maps.end() && inside->first < ptr + size) {
      misuse("cuMemAddressFree(0x%llx): memory is still mapped in the range (cuMemUnmap first)", ptr);
      return kInvalidValue;
    }
    ::munmap(reinterpret_cast<void*>(ptr), size);
    reg().reservations.erase(it);
    return kOk;
  });
}

CUresult cuMemMap(unsigned long long ptr, size_t size, size_t offset, unsigned long long handle,
                  unsigned long long flags) {
  return guarded([&] {
    if (flags != 0 || size == 0 || size % kGranularity != 0 || offset % kGranularity != 0) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    std::lock_guard<std::mutex> lock(reg().mu);
    auto h = reg().vmm_handles.find(handle);
    if (h == reg().vmm_handles.end() || h->second.fd < 0) return kInvalidValue;
    if (offset + size > h->second.size) return kInvalidValue;
    auto& res = reg().reservations;
    auto r = res.upper_bound(ptr);
    if (r == res.begin() || ptr + size > std::prev(r)->first + std::prev(r)->second) return kInvalidValue;
    auto& maps = reg().vmm_maps;
    auto next = maps.lower_bound(ptr);
    if (next != maps.end() && next->first < ptr + size) return kAlreadyMapped;
    if (next != maps.begin() && std::prev(next)->first + std::prev(next)->second.size > ptr) return kAlreadyMapped;
    void* m = ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->second.fd,
                     static_cast<off_t>(offset));
    if (m == MAP_FAILED) return kOutOfMemory;
    maps[ptr] = VmmMap{size, handle};
    h->second.maps++;
    return kOk;
  });
}

CUresult cuMemSetAccess(unsigned long long ptr, size_t size, const MemAccessDesc* desc, size_t count) {
  return guarded([&] {
    if (desc == nullptr || count == 0) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    int prot = PROT_NONE;  // one address space serves every device: the widest access asked for
    for (size_t i = 0; i < count; ++i) {
      if (desc[i].location.type != 1 || desc[i].location.id < 0 || desc[i].location.id >= device_count())
        return kInvalidValue;
      switch (desc[i].flags) {
        case 0: break;
        case 1:
          if (env_int("FAKE_CUDA_NO_READ_ONLY", 0)) return kInvalidValue;
          prot |= PROT_READ;
          break;
        case 3: prot |= PROT_READ | PROT_WRITE; break;
        default: return kInvalidValue;
      }
    }
    std::lock_guard<std::mutex> lock(reg().mu);
    auto covered = mappings_of(ptr, size);
    if (covered.empty()) return kInvalidValue;
    if (::mprotect(reinterpret_cast<void*>(ptr), size, prot) != 0) return kInvalidValue;
    for (auto it : covered) {  // accessible mappings are device allocations to the pointer queries
      if (prot == PROT_NONE) {
        reg().device_ranges.erase(it->first);
      } else {
        reg().device_ranges[it->first] = it->second.size;
      }
    }
    return kOk;
  });
}

CUresult cuMemUnmap(unsigned long long ptr, size_t size) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(reg().mu);
    auto covered = mappings_of(ptr, size);
    if (covered.empty()) {
      misuse("cuMemUnmap(0x%llx, %zu): not a mapped range", ptr, size);
      return kInvalidValue;
    }
    // The range goes back to being reserved: inaccessible, and no longer backed by the memfd.
    ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
           -1, 0);
    for (auto it : covered) {
      reg().device_ranges.erase(it->first);
      VmmHandle& h = reg().vmm_handles.at(it->second.handle);
      h.maps--;
      settle(h);
      reg().vmm_maps.erase(it);
    }
    return kOk;
  });
}

CUresult cuMemExportToShareableHandle(void* out, unsigned long long handle, int type, unsigned long long flags) {
  return guarded([&] {
    if (out == nullptr || type != kHandleTypePosixFd || flags != 0) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    std::lock_guard<std::mutex> lock(reg().mu);
    auto h = reg().vmm_handles.find(handle);
    if (h == reg().vmm_handles.end() || h->second.fd < 0) return kInvalidValue;
    if ((h->second.handle_types & kHandleTypePosixFd) == 0) return kNotSupported;  // not requested at creation
    int fd = ::fcntl(h->second.fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return kOutOfMemory;
    *static_cast<int*>(out) = fd;
    return kOk;
  });
}

CUresult cuMemImportFromShareableHandle(unsigned long long* handle, void* os_handle, int type) {
  return guarded([&] {
    if (handle == nullptr || type != kHandleTypePosixFd) return kInvalidValue;
    Life* life = nullptr;
    if (CUresult r = current(&life)) return r;
    const int fd = static_cast<int>(reinterpret_cast<intptr_t>(os_handle));
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0 || st.st_size <= 0 || st.st_size % kGranularity != 0) return kInvalidValue;
    int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);  // the caller keeps its descriptor
    if (own < 0) return kOutOfMemory;
    std::lock_guard<std::mutex> lock(reg().mu);
    uint64_t id = reg().next_vmm_handle++;
    reg().vmm_handles.emplace(id, VmmHandle{own, static_cast<size_t>(st.st_size), false, kHandleTypePosixFd});
    *handle = id;
    return kOk;
  });
}

CUresult cuMemcpyDtoDAsync_v2(unsigned long long dst, unsigned long long src, size_t n, void* s) {
  return guarded([&] {
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n, s, Direction::kDeviceToDevice,
                "cuMemcpyDtoDAsync");
  });
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  if (free_bytes == nullptr || total == nullptr) return kInvalidValue;
  Life* life = nullptr;
  if (CUresult r = current(&life)) return r;
  const unsigned long long limit = device_memory();
  std::lock_guard<std::mutex> lock(reg().mu);
  *free_bytes = reg().vmm_bytes < limit ? limit - reg().vmm_bytes : 0;
  *total = limit;
  return kOk;
}

// For tests.
unsigned fake_last_event_flags() { return g_event_flags.load(); }
long fake_copies_back() { return g_copies_back.load(); }
long fake_misuse_count() { return g_misuse.load(); }
long fake_pending_operations() { return g_pending_ops.load(); }
void* fake_current_context() { return t_current; }

int fake_live_contexts() {
  std::lock_guard<std::mutex> lock(reg().mu);
  int n = 0;
  for (const auto& c : reg().contexts) n += c.refs > 0;
  return n;
}

long fake_pinned_bytes() {
  std::lock_guard<std::mutex> lock(reg().mu);
  return reg().pinned_bytes;
}

long fake_vmm_bytes() {
  std::lock_guard<std::mutex> lock(reg().mu);
  return static_cast<long>(reg().vmm_bytes);
}

void fake_add_device_range(unsigned long long ptr, size_t size) {
  try {
    std::lock_guard<std::mutex> lock(reg().mu);
    reg().device_ranges[ptr] = size;
  } catch (...) {
  }
}

void fake_remove_device_range(unsigned long long ptr) {
  std::lock_guard<std::mutex> lock(reg().mu);
  reg().device_ranges.erase(ptr);
}

}  // extern "C"
