// A CPU stand-in for the CUDA driver (libcuda.so.1), for tests only, that behaves like a GPU.
//
// Built by the `fake_libcuda` fixture (tests/conftest.py) and loaded through SLLM_STORE_LIBCUDA, it
// runs the GPU code paths of the C++ core on a machine without a GPU. "Device memory" is host
// memory: a device pointer is a host address. Like a GPU, and unlike a synchronous stand-in:
//
// - Streams are asynchronous: each has a thread that runs its operations in order, a little later
//   (FAKE_CUDA_LAG_US); a copy reads its source when it runs, so a source reused too early
//   corrupts the destination. Events complete at their place in the stream; synchronize calls
//   block. Only page-locked sources (cuMemHostAlloc, cuMemHostRegister) copy asynchronously: a copy
//   from pageable memory returns once it has run.
// - Contexts: one primary context per device, reference counted (destroyed with its page-locked
//   memory when the last reference goes), current per thread. Calls that need a context fail with
//   CUDA_ERROR_INVALID_CONTEXT (201) without one, and streams and events work only under the
//   context they were made in.
// - Failures arrive late and stay: a failing copy is reported by the next synchronize that covers
//   it, then by every call under its context (a sticky error, as after an illegal address).
// - Misuse that a GPU would punish with corruption or a crash (freeing or unregistering memory
//   that a queued copy still uses, using memory of a destroyed context or a destroyed stream,
//   closing an IPC mapping never opened) prints "FAKE CUDA MISUSE: ..." and aborts
//   (FAKE_CUDA_MISUSE=count: only counts).
//
// Environment:
//   FAKE_CUDA_DEVICES=N          number of devices (default 1)
//   FAKE_CUDA_LAG_US=N           each stream operation runs N microseconds after the previous one
//                                (default 200)
//   FAKE_CUDA_COPY_MS=N          every copy takes N ms more
//   FAKE_CUDA_FAIL_COPY=N        the N-th host-to-device copy (1-based) fails when it runs (700)
//   FAKE_CUDA_FAIL_COPY_BACK=1   every device-to-host copy fails at once (700)
//   FAKE_CUDA_FLIP_COPY_BACK=1   every device-to-host copy flips a bit of what it copies
//   FAKE_CUDA_NO_HOST_ALLOC=1    cuMemHostAlloc fails (out of page-locked memory)
//   FAKE_CUDA_FAIL_HOST_ALLOC=N  the N-th cuMemHostAlloc fails; every allocation then takes
//                                FAKE_CUDA_ALLOC_DELAY_MS (default 20) ms, so that they overlap
//   FAKE_CUDA_FAIL_ADDRESS_RANGE=1  cuMemGetAddressRange always fails
//   FAKE_CUDA_MISUSE=count       count misuse instead of aborting
//
// Exported for tests (extern "C"): fake_last_event_flags(), fake_copies_back(),
// fake_misuse_count(), fake_pending_operations(), fake_current_context(), fake_live_contexts(),
// fake_pinned_bytes(), fake_add_device_range(ptr, size), fake_remove_device_range(ptr).
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <thread>

namespace {

using CUresult = int;
constexpr CUresult kOk = 0;
constexpr CUresult kInvalidValue = 1;
constexpr CUresult kOutOfMemory = 2;
constexpr CUresult kInvalidContext = 201;
constexpr CUresult kNotFound = 500;
constexpr CUresult kIllegalAddress = 700;
constexpr int kMaxDevices = 8;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

std::atomic<long> g_misuse{0};

void misuse(const std::string& what) {
  g_misuse++;
  std::fprintf(stderr, "FAKE CUDA MISUSE: %s\n", what.c_str());
  std::fflush(stderr);
  const char* mode = std::getenv("FAKE_CUDA_MISUSE");
  if (!(mode && std::strcmp(mode, "count") == 0)) std::abort();
}

struct Context {
  int device = 0;
  int refs = 0;  // guarded by g_mu
  std::atomic<CUresult> sticky{kOk};
};
Context g_contexts[kMaxDevices];
thread_local Context* t_current = nullptr;

struct Pinned {
  size_t size;
  Context* ctx;
  bool registered;
  bool dead;  // its context was destroyed
};

std::mutex g_mu;  // guards the tables below and Context::refs
std::map<uintptr_t, Pinned> g_pinned;               // base -> allocation or registration
std::map<uintptr_t, size_t> g_device_ranges;        // declared "device allocations"
std::map<uintptr_t, int> g_ipc_open;                // opened IPC bases -> count
std::multimap<uintptr_t, size_t> g_pending_ranges;  // host ranges read or written by queued copies
std::atomic<long> g_pending{0};
std::atomic<long> g_pinned_bytes{0};
std::atomic<long> g_h2d{0}, g_copies_back{0}, g_host_allocs{0};
std::atomic<unsigned> g_event_flags{~0u};

// The page-locked allocation holding [p, p+n), or nullptr. Caller holds g_mu.
Pinned* find_pinned(const void* p, size_t n) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = g_pinned.upper_bound(a);
  if (it == g_pinned.begin()) return nullptr;
  --it;
  return a + n <= it->first + it->second.size ? &it->second : nullptr;
}

bool pending_overlaps(uintptr_t base, size_t size) {  // caller holds g_mu
  for (const auto& [start, len] : g_pending_ranges)
    if (start < base + size && base < start + len) return true;
  return false;
}

void erase_pending(uintptr_t start, size_t len) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto range = g_pending_ranges.equal_range(start);
  for (auto it = range.first; it != range.second; ++it)
    if (it->second == len) {
      g_pending_ranges.erase(it);
      return;
    }
}

// The context a call runs under: the current one, alive, or an error.
CUresult current(Context** out) {
  Context* c = t_current;
  if (c == nullptr) return kInvalidContext;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (c->refs == 0) return kInvalidContext;
  }
  if (CUresult s = c->sticky.load()) return s;
  *out = c;
  return kOk;
}

struct Op {
  bool is_copy = false;
  void* dst = nullptr;
  const void* src = nullptr;
  size_t n = 0;
  bool fail = false;
  bool flip = false;
  uintptr_t host = 0;  // the host range registered in g_pending_ranges (0: none)
};

struct Stream {
  Context* ctx;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Op> queue;
  uint64_t enqueued = 0, done = 0;
  CUresult error = kOk;
  bool stopping = false, destroyed = false;
  std::thread thread;

  explicit Stream(Context* c) : ctx(c) { thread = std::thread([this] { run(); }); }

  void run() {
    const int lag = env_int("FAKE_CUDA_LAG_US", 200);
    const int copy_ms = env_int("FAKE_CUDA_COPY_MS", 0);
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return stopping || !queue.empty(); });
      if (queue.empty()) return;
      Op op = queue.front();
      lock.unlock();
      if (lag > 0) std::this_thread::sleep_for(std::chrono::microseconds(lag));
      CUresult r = kOk;
      if (op.is_copy) {
        if (copy_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(copy_ms));
        if (op.fail || ctx->sticky.load() != kOk) {
          r = kIllegalAddress;
        } else {
          std::memcpy(op.dst, op.src, op.n);
          if (op.flip && op.n) static_cast<unsigned char*>(op.dst)[op.n / 2] ^= 1;
        }
        if (op.host) erase_pending(op.host, op.n);
        g_pending--;
      }
      lock.lock();
      queue.pop_front();
      if (r != kOk) {
        if (error == kOk) error = r;
        ctx->sticky.store(r);
      }
      done++;
      cv.notify_all();
    }
  }

  // Queues op; returns its sequence number.
  uint64_t push(const Op& op) {
    std::lock_guard<std::mutex> lock(mu);
    queue.push_back(op);
    cv.notify_all();
    return ++enqueued;
  }

  CUresult wait_for(uint64_t seq) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done >= seq; });
    return error != kOk ? error : ctx->sticky.load();
  }
};

struct Event {
  Context* ctx;
  Stream* stream = nullptr;  // of the latest record
  uint64_t seq = 0;
};

// Streams and events are never freed (a destroyed stream's thread is joined): an event may still
// point at the stream of its last record.
CUresult use_stream(void* s, Stream** out) {
  Context* c = nullptr;
  if (CUresult r = current(&c)) return r;
  Stream* st = static_cast<Stream*>(s);
  if (st == nullptr) return kInvalidValue;
  if (st->destroyed) {
    misuse("a destroyed stream was used");
    return kInvalidValue;
  }
  if (st->ctx != c) return kInvalidContext;
  *out = st;
  return kOk;
}

CUresult copy(void* dst, const void* src, size_t n, void* s, bool to_device) {
  Stream* st = nullptr;
  if (CUresult r = use_stream(s, &st)) return r;
  const void* host = to_device ? src : dst;
  Op op;
  op.is_copy = true;
  op.dst = dst;
  op.src = src;
  op.n = n;
  bool pinned;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    Pinned* p = n ? find_pinned(host, n) : nullptr;
    if (p != nullptr && p->dead) {
      misuse("a copy uses page-locked memory of a destroyed context");
      return kInvalidValue;
    }
    pinned = p != nullptr;
    if (pinned) {
      op.host = reinterpret_cast<uintptr_t>(host);
      g_pending_ranges.emplace(op.host, n);
    }
  }
  if (to_device) {
    op.fail = ++g_h2d == env_int("FAKE_CUDA_FAIL_COPY", 0);
  } else {
    ++g_copies_back;
    if (env_int("FAKE_CUDA_FAIL_COPY_BACK", 0)) {
      if (op.host) erase_pending(op.host, n);
      return kIllegalAddress;
    }
    op.flip = env_int("FAKE_CUDA_FLIP_COPY_BACK", 0) != 0;
  }
  g_pending++;
  uint64_t seq = st->push(op);
  if (!pinned) {  // pageable memory: the call returns once the copy ran
    st->wait_for(seq);
  }
  return kOk;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return kOk; }
CUresult cuDeviceGetCount(int* n) {
  *n = env_int("FAKE_CUDA_DEVICES", 1);
  return kOk;
}
CUresult cuDeviceGet(int* dev, int ordinal) {
  if (ordinal < 0 || ordinal >= env_int("FAKE_CUDA_DEVICES", 1) || ordinal >= kMaxDevices) return kInvalidValue;
  *dev = ordinal;
  return kOk;
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  if (dev < 0 || dev >= kMaxDevices) return kInvalidValue;
  std::lock_guard<std::mutex> lock(g_mu);
  Context& c = g_contexts[dev];
  if (c.refs++ == 0) {
    c.device = dev;
    c.sticky.store(kOk);
  }
  *ctx = &c;
  return kOk;
}

CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
  if (dev < 0 || dev >= kMaxDevices) return kInvalidValue;
  std::lock_guard<std::mutex> lock(g_mu);
  Context& c = g_contexts[dev];
  if (c.refs == 0) return kInvalidContext;
  if (--c.refs == 0) {  // destroyed, with its page-locked memory
    for (auto& [base, p] : g_pinned)
      if (p.ctx == &c && !p.dead) {
        p.dead = true;
        if (!p.registered) g_pinned_bytes -= static_cast<long>(p.size);
      }
  }
  return kOk;
}

CUresult cuCtxSetCurrent(void* ctx) {
  Context* c = static_cast<Context*>(ctx);
  if (c != nullptr) {
    std::lock_guard<std::mutex> lock(g_mu);
    if (c < g_contexts || c >= g_contexts + kMaxDevices || c->refs == 0) return kInvalidContext;
  }
  t_current = c;
  return kOk;
}
CUresult cuCtxGetCurrent(void** ctx) {
  *ctx = t_current;
  return kOk;
}

CUresult cuStreamCreate(void** s, unsigned) {
  Context* c = nullptr;
  if (CUresult r = current(&c)) return r;
  *s = new (std::nothrow) Stream(c);
  return *s ? kOk : kOutOfMemory;
}
CUresult cuStreamDestroy_v2(void* s) {
  Stream* st = static_cast<Stream*>(s);
  if (st == nullptr || st->destroyed) return kInvalidValue;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    st->stopping = true;  // queued work completes first, as with CUDA
    st->cv.notify_all();
  }
  st->thread.join();
  st->destroyed = true;
  return kOk;
}
CUresult cuStreamSynchronize(void* s) {
  Stream* st = nullptr;
  CUresult r = use_stream(s, &st);
  if (r == kIllegalAddress) return r;
  if (r != kOk) return r;
  uint64_t seq;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    seq = st->enqueued;
  }
  return st->wait_for(seq);
}

CUresult cuEventCreate(void** e, unsigned flags) {
  Context* c = nullptr;
  if (CUresult r = current(&c)) return r;
  g_event_flags = flags;
  *e = new (std::nothrow) Event{c};
  return *e ? kOk : kOutOfMemory;
}
CUresult cuEventDestroy_v2(void* e) {
  if (e == nullptr) return kInvalidValue;
  return kOk;  // kept: a late synchronize on it stays safe
}
CUresult cuEventRecord(void* e, void* s) {
  Event* ev = static_cast<Event*>(e);
  Stream* st = nullptr;
  if (CUresult r = use_stream(s, &st)) return r;
  if (ev == nullptr || ev->ctx != st->ctx) return kInvalidContext;
  ev->seq = st->push(Op{});
  ev->stream = st;
  return kOk;
}
CUresult cuEventSynchronize(void* e) {
  Event* ev = static_cast<Event*>(e);
  Context* c = nullptr;
  CUresult r = current(&c);
  if (r != kOk) return r;
  if (ev == nullptr) return kInvalidValue;
  if (ev->ctx != c) return kInvalidContext;
  if (ev->stream == nullptr) return kOk;  // never recorded
  return ev->stream->wait_for(ev->seq);
}

CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t n, void* s) {
  return copy(reinterpret_cast<void*>(dst), src, n, s, true);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t n, void* s) {
  return copy(dst, reinterpret_cast<const void*>(src), n, s, false);
}

CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
  Context* c = nullptr;
  if (CUresult r = current(&c)) return r;
  if (env_int("FAKE_CUDA_NO_HOST_ALLOC", 0)) return kOutOfMemory;
  if (int fail = env_int("FAKE_CUDA_FAIL_HOST_ALLOC", 0)) {
    long k = ++g_host_allocs;
    std::this_thread::sleep_for(std::chrono::milliseconds(env_int("FAKE_CUDA_ALLOC_DELAY_MS", 20)));
    if (k == fail) return kOutOfMemory;
  }
  size_t size = (n + 4095) / 4096 * 4096;
  *p = std::aligned_alloc(4096, size ? size : 4096);
  if (*p == nullptr) return kOutOfMemory;
  std::lock_guard<std::mutex> lock(g_mu);
  g_pinned[reinterpret_cast<uintptr_t>(*p)] = Pinned{n, c, false, false};
  g_pinned_bytes += static_cast<long>(n);
  return kOk;
}

CUresult cuMemFreeHost(void* p) {
  Context* c = nullptr;
  if (CUresult r = current(&c); r != kOk && r != kIllegalAddress) return r;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_pinned.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_pinned.end() || it->second.registered) {
    misuse("cuMemFreeHost of memory cuMemHostAlloc did not return");
    return kInvalidValue;
  }
  if (it->second.dead) misuse("cuMemFreeHost of page-locked memory whose context was destroyed");
  if (pending_overlaps(it->first, it->second.size)) misuse("cuMemFreeHost while a queued copy uses the memory");
  if (!it->second.dead) g_pinned_bytes -= static_cast<long>(it->second.size);
  g_pinned.erase(it);
  std::free(p);
  return kOk;
}

CUresult cuMemHostRegister_v2(void* p, size_t n, unsigned) {
  Context* c = nullptr;
  if (CUresult r = current(&c)) return r;
  std::lock_guard<std::mutex> lock(g_mu);
  g_pinned[reinterpret_cast<uintptr_t>(p)] = Pinned{n, c, true, false};
  return kOk;
}
CUresult cuMemHostUnregister(void* p) {
  Context* c = nullptr;
  if (CUresult r = current(&c); r != kOk && r != kIllegalAddress) return r;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_pinned.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_pinned.end() || !it->second.registered) {
    misuse("cuMemHostUnregister of memory never registered");
    return kInvalidValue;
  }
  if (pending_overlaps(it->first, it->second.size)) misuse("cuMemHostUnregister while a queued copy uses the memory");
  g_pinned.erase(it);
  return kOk;
}

CUresult cuGetErrorString(CUresult r, const char** s) {
  switch (r) {
    case kIllegalAddress: *s = "an illegal memory access was encountered (fake)"; break;
    case kInvalidContext: *s = "invalid device context (fake)"; break;
    case kOutOfMemory: *s = "out of memory (fake)"; break;
    case kNotFound: *s = "named symbol not found (fake)"; break;
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
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_device_ranges.upper_bound(ptr);
  if (it == g_device_ranges.begin()) return kNotFound;
  --it;
  if (ptr >= it->first + it->second) return kNotFound;
  if (base) *base = it->first;
  if (size) *size = it->second;
  return kOk;
}
CUresult cuIpcGetMemHandle(IpcHandle* h, unsigned long long ptr) {
  unsigned long long base = 0;
  size_t size = 0;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_device_ranges.find(ptr);
    if (it == g_device_ranges.end()) return kInvalidValue;
    base = it->first;
    size = it->second;
  }
  std::memset(h->reserved, 0, sizeof h->reserved);
  long pid = ::getpid();
  std::memcpy(h->reserved, &pid, sizeof pid);
  std::memcpy(h->reserved + 8, &base, sizeof base);
  std::memcpy(h->reserved + 16, &size, sizeof size);
  return kOk;
}
CUresult cuIpcOpenMemHandle_v2(unsigned long long* ptr, IpcHandle h, unsigned) {
  Context* c = nullptr;
  if (CUresult r = current(&c)) return r;
  long pid = 0;
  unsigned long long base = 0;
  std::memcpy(&pid, h.reserved, sizeof pid);
  std::memcpy(&base, h.reserved + 8, sizeof base);
  if (pid != ::getpid()) return kInvalidValue;  // other processes' memory is out of reach here
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_device_ranges.find(base) == g_device_ranges.end()) return kInvalidValue;
  g_ipc_open[base]++;
  *ptr = base;
  return kOk;
}
CUresult cuIpcCloseMemHandle(unsigned long long ptr) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_ipc_open.find(ptr);
  if (it == g_ipc_open.end()) {
    misuse("cuIpcCloseMemHandle of a mapping never opened");
    return kInvalidValue;
  }
  if (--it->second == 0) g_ipc_open.erase(it);
  return kOk;
}
CUresult cuPointerGetAttribute(void* data, int attribute, unsigned long long ptr) {
  if (attribute != 9) return kInvalidValue;  // CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
  if (cuMemGetAddressRange_v2(nullptr, nullptr, ptr) != kOk) return kInvalidValue;
  *static_cast<int*>(data) = 0;
  return kOk;
}
CUresult cuDeviceGetPCIBusId(char* buf, int len, int dev) {
  if (len < 13) return kInvalidValue;
  std::strcpy(buf, "0000:00:00.0");
  buf[9] = static_cast<char>('0' + dev % 10);
  return kOk;
}
CUresult cuDeviceGetByPCIBusId(int* dev, const char* id) {
  if (id == nullptr || std::strlen(id) < 10) return kInvalidValue;
  int d = id[9] - '0';
  if (d < 0 || d >= env_int("FAKE_CUDA_DEVICES", 1)) return kInvalidValue;
  *dev = d;
  return kOk;
}

// For tests.
unsigned fake_last_event_flags() { return g_event_flags.load(); }
long fake_copies_back() { return g_copies_back.load(); }
long fake_misuse_count() { return g_misuse.load(); }
long fake_pending_operations() { return g_pending.load(); }
void* fake_current_context() { return t_current; }
int fake_live_contexts() {
  std::lock_guard<std::mutex> lock(g_mu);
  int n = 0;
  for (const auto& c : g_contexts) n += c.refs > 0;
  return n;
}
long fake_pinned_bytes() { return g_pinned_bytes.load(); }
void fake_add_device_range(unsigned long long ptr, size_t size) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_device_ranges[ptr] = size;
}
void fake_remove_device_range(unsigned long long ptr) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_device_ranges.erase(ptr);
}

}  // extern "C"
