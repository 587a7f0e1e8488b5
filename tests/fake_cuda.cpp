// A CPU stand-in for the CUDA driver (libcuda.so.1), for tests only.
//
// Built by tests/test_fake_cuda.py and loaded through SLLM_STORE_LIBCUDA, it lets the GPU code
// paths of the C++ core (pinned staging buffers, per-worker streams, events, host-to-device
// copies, the registered pool) run on a machine without a GPU. "Device memory" is host memory:
// a device pointer is a host address. Copies run synchronously in the calling thread.
//
// Fault injection, from the environment:
//   FAKE_CUDA_FAIL_COPY=N   the N-th cuMemcpyHtoDAsync (1-based) fails with error 700
//   FAKE_CUDA_FAIL_COPY_BACK=1  every cuMemcpyDtoHAsync fails with error 700
//   FAKE_CUDA_FLIP_COPY_BACK=1  every cuMemcpyDtoHAsync flips a bit of what it copies (as if the
//                               device memory had changed since it was loaded)
//   FAKE_CUDA_COPY_MS=N     every copy takes N ms more (a slow device)
//   FAKE_CUDA_DEVICES=N     number of devices (default 1)
//   FAKE_CUDA_NO_HOST_ALLOC=1  cuMemHostAlloc fails (out of page-locked memory)
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

extern "C" {

using CUresult = int;
constexpr CUresult kOk = 0;
constexpr CUresult kInvalidValue = 1;
constexpr CUresult kIllegalAddress = 700;

static std::atomic<long> g_copies{0};
static std::atomic<long> g_copies_back{0};
static int g_context_tag = 0;  // the one primary context: its address is the handle

static int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

CUresult cuInit(unsigned) { return kOk; }
CUresult cuDeviceGetCount(int* n) {
  *n = env_int("FAKE_CUDA_DEVICES", 1);
  return kOk;
}
CUresult cuDeviceGet(int* dev, int ordinal) {
  if (ordinal < 0 || ordinal >= env_int("FAKE_CUDA_DEVICES", 1)) return kInvalidValue;
  *dev = ordinal;
  return kOk;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
  *ctx = &g_context_tag;
  return kOk;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return kOk; }
CUresult cuCtxSetCurrent(void*) { return kOk; }
CUresult cuCtxGetCurrent(void** ctx) {
  *ctx = &g_context_tag;
  return kOk;
}

struct FakeStream {
  int unused;
};
struct FakeEvent {
  int unused;
};

CUresult cuStreamCreate(void** s, unsigned) {
  *s = new (std::nothrow) FakeStream{0};
  return *s ? kOk : kInvalidValue;
}
CUresult cuStreamDestroy_v2(void* s) {
  delete static_cast<FakeStream*>(s);
  return kOk;
}
CUresult cuStreamSynchronize(void*) { return kOk; }
// The flags of the last event created (tests read them through fake_last_event_flags()).
static std::atomic<unsigned> g_event_flags{~0u};
unsigned fake_last_event_flags() { return g_event_flags.load(); }
// Device-to-host copies so far (the remote tier's cache written from what it loaded).
long fake_copies_back() { return g_copies_back.load(); }

CUresult cuEventCreate(void** e, unsigned flags) {
  g_event_flags = flags;
  *e = new (std::nothrow) FakeEvent{0};
  return *e ? kOk : kInvalidValue;
}
CUresult cuEventDestroy_v2(void* e) {
  delete static_cast<FakeEvent*>(e);
  return kOk;
}
CUresult cuEventRecord(void*, void*) { return kOk; }
CUresult cuEventSynchronize(void*) { return kOk; }

CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t n, void*) {
  long k = ++g_copies;
  if (k == env_int("FAKE_CUDA_FAIL_COPY", 0)) return kIllegalAddress;
  if (int ms = env_int("FAKE_CUDA_COPY_MS", 0)) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  return kOk;
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t n, void*) {
  ++g_copies_back;
  if (env_int("FAKE_CUDA_FAIL_COPY_BACK", 0)) return kIllegalAddress;
  std::memcpy(dst, reinterpret_cast<const void*>(src), n);
  if (n && env_int("FAKE_CUDA_FLIP_COPY_BACK", 0)) static_cast<unsigned char*>(dst)[n / 2] ^= 1;
  return kOk;
}

CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
  if (env_int("FAKE_CUDA_NO_HOST_ALLOC", 0)) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
  *p = std::aligned_alloc(4096, (n + 4095) / 4096 * 4096);
  return *p ? kOk : 2;  // CUDA_ERROR_OUT_OF_MEMORY
}
CUresult cuMemFreeHost(void* p) {
  std::free(p);
  return kOk;
}
CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return kOk; }
CUresult cuMemHostUnregister(void*) { return kOk; }

CUresult cuGetErrorString(CUresult r, const char** s) {
  *s = r == kIllegalAddress ? "an illegal memory access was encountered (fake)" : "fake CUDA error";
  return kOk;
}

// IPC and pointer queries: not used by the in-process paths these tests cover.
struct IpcHandle {
  char reserved[64];
};
CUresult cuIpcGetMemHandle(IpcHandle*, unsigned long long) { return kInvalidValue; }
CUresult cuIpcOpenMemHandle_v2(unsigned long long*, IpcHandle, unsigned) { return kInvalidValue; }
CUresult cuIpcCloseMemHandle(unsigned long long) { return kOk; }
CUresult cuMemGetAddressRange_v2(unsigned long long*, size_t*, unsigned long long) { return kInvalidValue; }
CUresult cuPointerGetAttribute(void*, int, unsigned long long) { return kInvalidValue; }
CUresult cuDeviceGetPCIBusId(char* buf, int len, int dev) {
  if (len < 13) return kInvalidValue;
  std::strcpy(buf, "0000:00:00.0");
  buf[9] = static_cast<char>('0' + dev % 10);
  return kOk;
}
CUresult cuDeviceGetByPCIBusId(int* dev, const char*) {
  *dev = 0;
  return kOk;
}

}  // extern "C"
