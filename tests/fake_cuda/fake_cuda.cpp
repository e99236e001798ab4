// fake_cuda.cpp — a CUDA driver stand-in over host memory, for tests on machines without a GPU.
//
// Exports the driver symbols the cuda backend loads (see csrc/core/cuda_driver.h), so with
// EKV_LIBCUDA pointing here the real backend code runs unchanged:
//   cuMemAddressReserve  -> mmap(PROT_NONE) reservation
//   cuMemCreate          -> one memfd per handle, committed with fallocate
//   cuMemMap             -> mmap(MAP_SHARED|MAP_FIXED) of the memfd, still PROT_NONE
//   cuMemSetAccess       -> mprotect(READ|WRITE); the range may span several mappings but every
//                           byte of it must be mapped (the driver's rule); the fake is stricter
//                           and wants whole mappings
//   cuMemUnmap           -> back to a PROT_NONE reservation
// It checks what the real driver checks (alignment, reservation bounds, overlapping maps, a
// current context: torch may call the allocator from threads where none is current, so every
// memory and event call answers CUDA_ERROR_INVALID_CONTEXT unless a retained primary context is
// current on the calling thread; a stream must exist: cuEventRecord and cuStreamSynchronize on
// one it does not know answer CUDA_ERROR_INVALID_HANDLE), counts live objects, and can be told to
// fail the Nth call of any function.
//
// Streams: the legacy default stream (0), CU_STREAM_LEGACY (1), CU_STREAM_PER_THREAD (2) and the
// ones ekvfake_stream_create made. Events complete per stream, modelling queued device work: an
// event recorded on a held stream (ekvfake_stream_hold) stays CUDA_ERROR_NOT_READY until the
// stream is let go or completed (ekvfake_stream_complete), a cuStreamSynchronize of it, a
// cuEventSynchronize of it or of a later event on the same stream (streams run in order), a
// cuCtxSynchronize or ekvfake_complete_events(). ekvfake_set_events_complete(0) holds every stream.
// Memory: cuMemGetInfo and cuMemCreate also count bytes held by "others" (other processes,
// ekvfake_set_other_used). Latency: ekvfake_set_latency(fn, ns) makes each call of fn take ns
// longer (slept outside the driver lock, so calls on other threads overlap with it).
//
// Control functions (ekvfake_*) are plain C for ctypes; torch_elastic_kv.testing wraps them.
// The library is one simulated machine, so its state is process-global by design.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "core/cuda_driver.h"

#define EKVFAKE_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr std::size_t kGranularity = std::size_t(2) << 20;

struct FakeContext {
  int device;
  int refcount;
};

struct FakeEvent {
  bool complete = true;
  CUstream stream = nullptr;      // of the last record, so a stream synchronize finishes only its own work
  unsigned long long serial = 0;  // record order, so waiting for one finishes the earlier ones
};

struct FakeStream {
  bool held = false;  // events recorded on it stay not-ready (its queued work has not run)
};

struct Mapping {
  std::size_t size;
  CUmemGenericAllocationHandle handle;
  bool accessible;
};

struct Handle {
  int fd;
  std::size_t size;
  int device;  // prop.location.id at create: the device whose memory this is
};

struct State {
  std::mutex mu;
  bool initialized = false;
  int device_count = 1;
  std::size_t total_memory = std::size_t(8) << 30;
  std::size_t used_memory = 0;
  FakeContext contexts[16] = {};
  std::map<CUdeviceptr, std::size_t> reservations;
  std::map<CUmemGenericAllocationHandle, Handle> handles;
  std::map<CUdeviceptr, Mapping> mappings;  // by start address
  std::set<FakeEvent*> events;
  // The streams that exist: the defaults (legacy 0, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD) and
  // those tests made.
  std::map<CUstream, FakeStream> streams = {{reinterpret_cast<CUstream>(std::uintptr_t(0)), FakeStream{}},
                                            {reinterpret_cast<CUstream>(std::uintptr_t(1)), FakeStream{}},
                                            {reinterpret_cast<CUstream>(std::uintptr_t(2)), FakeStream{}}};
  unsigned long long next_record = 1;
  std::uintptr_t next_stream = 0x5000;
  std::size_t other_used = 0;  // device memory held outside this process
  CUmemGenericAllocationHandle next_handle = 1;
  bool events_complete = true;
  long long creates = 0;
  long long releases = 0;
  std::map<std::string, long long> calls;    // per function, since reset
  std::map<std::string, long long> fail_at;  // function -> call number that fails
  std::map<std::string, int> fail_code;
};

State& state() {
  static State s;  // one simulated machine per process
  return s;
}

thread_local CUcontext current_ctx = nullptr;

// Per-function latencies, apart from the driver lock so that a slow call does not hold it.
struct Latencies {
  std::mutex mu;
  std::map<std::string, long long> ns;
  std::atomic<bool> any{false};
};

Latencies& latencies() {
  static Latencies l;
  return l;
}

void delay(const char* fn) {
  Latencies& l = latencies();
  if (!l.any.load(std::memory_order_relaxed)) return;
  long long ns = 0;
  {
    std::lock_guard<std::mutex> lock(l.mu);
    auto it = l.ns.find(fn);
    if (it != l.ns.end()) ns = it->second;
  }
  if (ns > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}

void default_streams(State& s) {
  s.streams.clear();
  for (std::uintptr_t h : {std::uintptr_t(0), std::uintptr_t(1), std::uintptr_t(2)}) {
    s.streams[reinterpret_cast<CUstream>(h)] = FakeStream{};
  }
}

// Completes the events recorded on `stream` up to record serial `upto` (all of them when 0).
void complete_stream(State& s, CUstream stream, unsigned long long upto) {
  for (FakeEvent* e : s.events) {
    if (e->stream == stream && (upto == 0 || e->serial <= upto)) e->complete = true;
  }
}

// Counts the call and answers the injected error if this is the armed call. Caller holds mu.
CUresult injected(State& s, const char* fn) {
  long long n = ++s.calls[fn];
  auto it = s.fail_at.find(fn);
  if (it != s.fail_at.end() && it->second == n) {
    s.fail_at.erase(it);
    return s.fail_code[fn];
  }
  return CUDA_SUCCESS;
}

#define FAKE_ENTER(fn)                    \
  delay(fn);                              \
  State& s = state();                     \
  std::lock_guard<std::mutex> lock(s.mu); \
  if (CUresult _rc = injected(s, fn)) return _rc;

#define FAKE_NEED_INIT() \
  if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;

// The calling thread's current context must be a primary context that is still retained (the
// real driver fails such calls without a current context; a released one is gone).
#define FAKE_NEED_CTX() \
  FAKE_NEED_INIT();     \
  if (current_device(s) < 0) return CUDA_ERROR_INVALID_CONTEXT;

// Device of the current context if it is a retained primary context, else -1.
int current_device(State& s) {
  for (int d = 0; d < 16; ++d) {
    if (current_ctx == reinterpret_cast<CUcontext>(&s.contexts[d])) return s.contexts[d].refcount > 0 ? d : -1;
  }
  return -1;
}

bool inside_reservation(const State& s, CUdeviceptr p, std::size_t size) {
  auto it = s.reservations.upper_bound(p);
  if (it == s.reservations.begin()) return false;
  --it;
  return p >= it->first && p + size <= it->first + it->second;
}

bool overlaps_mapping(const State& s, CUdeviceptr p, std::size_t size) {
  auto it = s.mappings.lower_bound(p);
  if (it != s.mappings.end() && it->first < p + size) return true;
  if (it != s.mappings.begin()) {
    --it;
    if (it->first + it->second.size > p) return true;
  }
  return false;
}

void* as_ptr(CUdeviceptr p) { return reinterpret_cast<void*>(static_cast<std::uintptr_t>(p)); }

// Whether [p, p + size) lies in mappings that were given access, as a copy needs.
bool accessible(State& s, CUdeviceptr p, std::size_t size) {
  auto it = s.mappings.upper_bound(p);
  if (it == s.mappings.begin()) return false;
  --it;
  CUdeviceptr end = p + size;
  for (CUdeviceptr at = p; at < end; at = it->first + it->second.size, ++it) {
    if (it == s.mappings.end() || it->first > at || it->first + it->second.size <= at || !it->second.accessible) {
      return false;
    }
  }
  return true;
}

}  // namespace

// ---- driver entry points ---------------------------------------------------------------------

EKVFAKE_API CUresult cuInit(unsigned int flags) {
  FAKE_ENTER("cuInit");
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  s.initialized = true;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuDriverGetVersion(int* version) {
  FAKE_ENTER("cuDriverGetVersion");
  if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *version = 12040;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuDeviceGetCount(int* count) {
  FAKE_ENTER("cuDeviceGetCount");
  FAKE_NEED_INIT();
  if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *count = s.device_count;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
  FAKE_ENTER("cuDeviceGet");
  FAKE_NEED_INIT();
  if (dev == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal < 0 || ordinal >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
  *dev = ordinal;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
  FAKE_ENTER("cuDevicePrimaryCtxRetain");
  FAKE_NEED_INIT();
  if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if (dev < 0 || dev >= s.device_count) return CUDA_ERROR_INVALID_DEVICE;
  s.contexts[dev].device = dev;
  s.contexts[dev].refcount += 1;
  *ctx = reinterpret_cast<CUcontext>(&s.contexts[dev]);
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
  FAKE_ENTER("cuDevicePrimaryCtxRelease");
  if (dev < 0 || dev >= s.device_count || s.contexts[dev].refcount == 0) return CUDA_ERROR_INVALID_DEVICE;
  s.contexts[dev].refcount -= 1;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuCtxGetCurrent(CUcontext* ctx) {
  FAKE_ENTER("cuCtxGetCurrent");
  if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *ctx = current_ctx;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuCtxSetCurrent(CUcontext ctx) {
  FAKE_ENTER("cuCtxSetCurrent");
  current_ctx = ctx;
  return CUDA_SUCCESS;
}

// Waits for all simulated device work: every recorded event completes.
EKVFAKE_API CUresult cuCtxSynchronize() {
  FAKE_ENTER("cuCtxSynchronize");
  FAKE_NEED_CTX();
  for (FakeEvent* e : s.events) e->complete = true;
  return CUDA_SUCCESS;
}

// Waits for the simulated work queued on one stream: the events recorded on it complete.
EKVFAKE_API CUresult cuStreamSynchronize(CUstream stream) {
  FAKE_ENTER("cuStreamSynchronize");
  FAKE_NEED_CTX();
  if (s.streams.count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
  complete_stream(s, stream, 0);
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuGetErrorName(CUresult rc, const char** name) {
  if (name == nullptr) return CUDA_ERROR_INVALID_VALUE;
  switch (rc) {
    case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_NO_DEVICE: *name = "CUDA_ERROR_NO_DEVICE"; break;
    case CUDA_ERROR_INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_NOT_READY: *name = "CUDA_ERROR_NOT_READY"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *name = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *name = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemGetInfo_v2(std::size_t* free_bytes, std::size_t* total_bytes) {
  FAKE_ENTER("cuMemGetInfo");
  FAKE_NEED_CTX();
  if (free_bytes == nullptr || total_bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *total_bytes = s.total_memory;
  const std::size_t used = s.used_memory + s.other_used;
  *free_bytes = used >= s.total_memory ? 0 : s.total_memory - used;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemGetAllocationGranularity(std::size_t* gran, const CUmemAllocationProp* prop, int option) {
  FAKE_ENTER("cuMemGetAllocationGranularity");
  FAKE_NEED_CTX();
  if (gran == nullptr || prop == nullptr || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
      prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE || option < 0 || option > 1) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  *gran = kGranularity;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemAddressReserve(CUdeviceptr* ptr, std::size_t size, std::size_t alignment, CUdeviceptr addr,
                                         unsigned long long flags) {
  FAKE_ENTER("cuMemAddressReserve");
  FAKE_NEED_CTX();
  (void)addr;  // hints are optional for the real driver too
  if (ptr == nullptr || size == 0 || size % kGranularity != 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  std::size_t align = alignment == 0 ? kGranularity : alignment;
  if (align % kGranularity != 0) return CUDA_ERROR_INVALID_VALUE;
  void* p = ::mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  std::uintptr_t raw = reinterpret_cast<std::uintptr_t>(p);
  std::uintptr_t base = (raw + align - 1) / align * align;
  if (base > raw) ::munmap(p, base - raw);
  std::uintptr_t end = raw + size + align;
  if (end > base + size) ::munmap(reinterpret_cast<void*>(base + size), end - (base + size));
  s.reservations[base] = size;
  *ptr = base;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemAddressFree(CUdeviceptr ptr, std::size_t size) {
  FAKE_ENTER("cuMemAddressFree");
  FAKE_NEED_CTX();
  auto it = s.reservations.find(ptr);
  if (it == s.reservations.end() || it->second != size) return CUDA_ERROR_INVALID_VALUE;
  if (overlaps_mapping(s, ptr, size)) return CUDA_ERROR_INVALID_VALUE;  // still mapped inside
  ::munmap(as_ptr(ptr), size);
  s.reservations.erase(it);
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemCreate(CUmemGenericAllocationHandle* handle, std::size_t size,
                                 const CUmemAllocationProp* prop, unsigned long long flags) {
  FAKE_ENTER("cuMemCreate");
  FAKE_NEED_CTX();
  if (handle == nullptr || prop == nullptr || flags != 0 || size == 0 || size % kGranularity != 0) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      prop->location.id < 0 || prop->location.id >= s.device_count ||
      prop->requestedHandleTypes != CU_MEM_HANDLE_TYPE_NONE || prop->win32HandleMetaData != nullptr) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (s.used_memory + s.other_used + size > s.total_memory) return CUDA_ERROR_OUT_OF_MEMORY;
  int fd = ::memfd_create("ekv_fake_cuda", MFD_CLOEXEC);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0 || ::fallocate(fd, 0, 0, static_cast<off_t>(size)) != 0) {
    ::close(fd);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  CUmemGenericAllocationHandle h = s.next_handle++;
  s.handles[h] = Handle{fd, size, prop->location.id};
  s.used_memory += size;
  s.creates += 1;
  *handle = h;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
  FAKE_ENTER("cuMemRelease");
  FAKE_NEED_CTX();
  auto it = s.handles.find(handle);
  if (it == s.handles.end()) return CUDA_ERROR_INVALID_VALUE;
  // As with the real driver, memory still mapped stays valid until unmapped (mmap holds it).
  ::close(it->second.fd);
  s.used_memory -= it->second.size;
  s.handles.erase(it);
  s.releases += 1;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemMap(CUdeviceptr ptr, std::size_t size, std::size_t offset,
                              CUmemGenericAllocationHandle handle, unsigned long long flags) {
  FAKE_ENTER("cuMemMap");
  FAKE_NEED_CTX();
  auto it = s.handles.find(handle);
  if (it == s.handles.end() || flags != 0 || offset != 0 || size != it->second.size) return CUDA_ERROR_INVALID_VALUE;
  if (ptr % kGranularity != 0 || !inside_reservation(s, ptr, size) || overlaps_mapping(s, ptr, size)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  void* p = ::mmap(as_ptr(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, it->second.fd, 0);
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  s.mappings[ptr] = Mapping{size, handle, false};
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemSetAccess(CUdeviceptr ptr, std::size_t size, const CUmemAccessDesc* desc, std::size_t count) {
  FAKE_ENTER("cuMemSetAccess");
  FAKE_NEED_CTX();
  if (desc == nullptr || count == 0) return CUDA_ERROR_INVALID_VALUE;
  for (std::size_t i = 0; i < count; ++i) {
    if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE || desc[i].location.id < 0 ||
        desc[i].location.id >= s.device_count || desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
      return CUDA_ERROR_INVALID_VALUE;
    }
  }
  // The range must be exactly covered by mappings, and the memory's own device must be given
  // access (the fake models one device per handle, without peer access).
  CUdeviceptr p = ptr;
  while (p < ptr + size) {
    auto it = s.mappings.find(p);
    if (it == s.mappings.end()) return CUDA_ERROR_INVALID_VALUE;
    const int owner = s.handles.count(it->second.handle) ? s.handles[it->second.handle].device : -1;
    bool granted = false;
    for (std::size_t i = 0; i < count; ++i) granted = granted || desc[i].location.id == owner;
    if (!granted) return CUDA_ERROR_INVALID_VALUE;
    p += it->second.size;
  }
  if (p != ptr + size) return CUDA_ERROR_INVALID_VALUE;
  if (::mprotect(as_ptr(ptr), size, PROT_READ | PROT_WRITE) != 0) return CUDA_ERROR_INVALID_VALUE;
  for (p = ptr; p < ptr + size; p += s.mappings[p].size) s.mappings[p].accessible = true;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemUnmap(CUdeviceptr ptr, std::size_t size) {
  FAKE_ENTER("cuMemUnmap");
  FAKE_NEED_CTX();
  CUdeviceptr p = ptr;
  while (p < ptr + size) {
    auto it = s.mappings.find(p);
    if (it == s.mappings.end()) return CUDA_ERROR_INVALID_VALUE;
    p += it->second.size;
  }
  if (p != ptr + size) return CUDA_ERROR_INVALID_VALUE;
  void* r = ::mmap(as_ptr(ptr), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return CUDA_ERROR_INVALID_VALUE;
  for (p = ptr; p < ptr + size;) {
    auto it = s.mappings.find(p);
    p += it->second.size;
    s.mappings.erase(it);
  }
  return CUDA_SUCCESS;
}

// Synchronous copies, like the driver's: the simulated device has no queued work to wait for.
EKVFAKE_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t size) {
  FAKE_ENTER("cuMemcpyDtoH");
  FAKE_NEED_CTX();
  if (dst == nullptr || !accessible(s, src, size)) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(dst, as_ptr(src), size);
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, std::size_t size) {
  FAKE_ENTER("cuMemcpyHtoD");
  FAKE_NEED_CTX();
  if (src == nullptr || !accessible(s, dst, size)) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(as_ptr(dst), src, size);
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuEventCreate(CUevent* event, unsigned int flags) {
  FAKE_ENTER("cuEventCreate");
  FAKE_NEED_CTX();
  (void)flags;
  if (event == nullptr) return CUDA_ERROR_INVALID_VALUE;
  FakeEvent* e = new FakeEvent();
  s.events.insert(e);
  *event = reinterpret_cast<CUevent>(e);
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuEventRecord(CUevent event, CUstream stream) {
  FAKE_ENTER("cuEventRecord");
  FAKE_NEED_CTX();
  FakeEvent* e = reinterpret_cast<FakeEvent*>(event);
  if (s.events.count(e) == 0) return CUDA_ERROR_INVALID_VALUE;
  auto st = s.streams.find(stream);
  if (st == s.streams.end()) return CUDA_ERROR_INVALID_HANDLE;
  e->complete = s.events_complete && !st->second.held;
  e->stream = stream;
  e->serial = s.next_record++;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuEventQuery(CUevent event) {
  FAKE_ENTER("cuEventQuery");
  FAKE_NEED_CTX();
  FakeEvent* e = reinterpret_cast<FakeEvent*>(event);
  if (s.events.count(e) == 0) return CUDA_ERROR_INVALID_VALUE;
  return e->complete ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EKVFAKE_API CUresult cuEventSynchronize(CUevent event) {
  FAKE_ENTER("cuEventSynchronize");
  FAKE_NEED_CTX();
  FakeEvent* e = reinterpret_cast<FakeEvent*>(event);
  if (s.events.count(e) == 0) return CUDA_ERROR_INVALID_VALUE;
  // "Waiting" finishes the simulated work queued on its stream up to the event.
  if (e->serial != 0) complete_stream(s, e->stream, e->serial);
  e->complete = true;
  return CUDA_SUCCESS;
}

EKVFAKE_API CUresult cuEventDestroy_v2(CUevent event) {
  FAKE_ENTER("cuEventDestroy");
  FAKE_NEED_CTX();
  FakeEvent* e = reinterpret_cast<FakeEvent*>(event);
  if (s.events.erase(e) == 0) return CUDA_ERROR_INVALID_VALUE;
  delete e;
  return CUDA_SUCCESS;
}

// ---- control functions -----------------------------------------------------------------------

// Forgets injected failures, call counts, latencies, memory of others and the streams tests
// made (holds included), sets events to complete at record time, restores the default device
// count and memory size. Live objects are kept (they belong to arenas).
EKVFAKE_API void ekvfake_reset() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.calls.clear();
  s.fail_at.clear();
  s.fail_code.clear();
  s.events_complete = true;
  s.device_count = 1;
  s.total_memory = std::size_t(8) << 30;
  s.other_used = 0;
  s.creates = 0;
  s.releases = 0;
  default_streams(s);
  Latencies& l = latencies();
  std::lock_guard<std::mutex> llock(l.mu);
  l.ns.clear();
  l.any.store(false);
}

// Makes the nth call (1-based, counted from now) of `fn` (e.g. "cuMemCreate") return `code`
// (0 = CUDA_ERROR_OUT_OF_MEMORY). Returns 0, or -1 for bad arguments.
EKVFAKE_API int ekvfake_fail_nth(const char* fn, long long nth, int code) {
  if (fn == nullptr || nth < 1) return -1;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.fail_at[fn] = s.calls[fn] + nth;
  s.fail_code[fn] = code == 0 ? CUDA_ERROR_OUT_OF_MEMORY : code;
  return 0;
}

EKVFAKE_API long long ekvfake_calls(const char* fn) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.calls.find(fn);
  return it == s.calls.end() ? 0 : it->second;
}

EKVFAKE_API long long ekvfake_live_handles() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return static_cast<long long>(s.handles.size());
}

EKVFAKE_API long long ekvfake_live_mappings() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return static_cast<long long>(s.mappings.size());
}

EKVFAKE_API long long ekvfake_live_reservations() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return static_cast<long long>(s.reservations.size());
}

EKVFAKE_API long long ekvfake_live_events() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return static_cast<long long>(s.events.size());
}

EKVFAKE_API long long ekvfake_create_count() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.creates;
}

EKVFAKE_API long long ekvfake_release_count() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.releases;
}

EKVFAKE_API long long ekvfake_used_bytes() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return static_cast<long long>(s.used_memory);
}

EKVFAKE_API void ekvfake_set_total_memory(long long nbytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.total_memory = static_cast<std::size_t>(nbytes);
}

EKVFAKE_API void ekvfake_set_device_count(int count) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.device_count = count < 0 ? 0 : (count > 16 ? 16 : count);
}

// 0: events recorded from now stay not-ready (queued device work); 1: complete at record.
EKVFAKE_API void ekvfake_set_events_complete(int complete) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.events_complete = complete != 0;
}

// References held on device `dev`'s primary context (cuDevicePrimaryCtxRetain minus releases).
EKVFAKE_API int ekvfake_primary_ctx_refcount(int dev) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return dev < 0 || dev >= 16 ? -1 : s.contexts[dev].refcount;
}

// Destroys every live event and returns how many there were: for tests that made
// cuEventDestroy fail on purpose, to put the simulated machine back once nothing uses events.
EKVFAKE_API long long ekvfake_forget_events() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  const long long n = static_cast<long long>(s.events.size());
  for (FakeEvent* e : s.events) delete e;
  s.events.clear();
  return n;
}

// Finishes all simulated device work: every recorded event becomes complete.
EKVFAKE_API void ekvfake_complete_events() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  for (FakeEvent* e : s.events) e->complete = true;
}

// Makes a stream the driver knows: `handle` (any value but 0, 1, 2), or a fresh one when 0.
// Returns its handle, or 0 when `handle` is a stream already.
EKVFAKE_API unsigned long long ekvfake_stream_create(unsigned long long handle) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  CUstream h = reinterpret_cast<CUstream>(static_cast<std::uintptr_t>(handle));
  if (handle == 0) {
    do {
      s.next_stream += 0x10;
      h = reinterpret_cast<CUstream>(s.next_stream);
    } while (s.streams.count(h) != 0);
  } else if (s.streams.count(h) != 0) {
    return 0;
  }
  s.streams[h] = FakeStream{};
  return static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(h));
}

// Forgets a stream made by ekvfake_stream_create (its events complete, as its work would before
// a real stream is destroyed). Returns 0, or -1 if there is no such stream (or it is a default).
EKVFAKE_API int ekvfake_stream_destroy(unsigned long long handle) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  CUstream h = reinterpret_cast<CUstream>(static_cast<std::uintptr_t>(handle));
  if (handle <= 2 || s.streams.count(h) == 0) return -1;
  complete_stream(s, h, 0);
  s.streams.erase(h);
  return 0;
}

// held 1: events recorded on the stream from now stay not-ready (its work is queued, not run);
// held 0: lets it go, and the events recorded on it complete. Returns 0, or -1 if no such stream.
EKVFAKE_API int ekvfake_stream_hold(unsigned long long handle, int held) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.streams.find(reinterpret_cast<CUstream>(static_cast<std::uintptr_t>(handle)));
  if (it == s.streams.end()) return -1;
  it->second.held = held != 0;
  if (held == 0) complete_stream(s, it->first, 0);
  return 0;
}

// The work queued on the stream so far finishes (its events complete); a hold stays for later
// records. Returns 0, or -1 if no such stream.
EKVFAKE_API int ekvfake_stream_complete(unsigned long long handle) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.streams.find(reinterpret_cast<CUstream>(static_cast<std::uintptr_t>(handle)));
  if (it == s.streams.end()) return -1;
  complete_stream(s, it->first, 0);
  return 0;
}

// Events recorded on the stream and not complete: 0 when its work is done; -1 if no such stream.
EKVFAKE_API long long ekvfake_stream_pending_events(unsigned long long handle) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  CUstream h = reinterpret_cast<CUstream>(static_cast<std::uintptr_t>(handle));
  if (s.streams.count(h) == 0) return -1;
  long long n = 0;
  for (FakeEvent* e : s.events) n += (e->serial != 0 && e->stream == h && !e->complete) ? 1 : 0;
  return n;
}

// Device memory held by others (other processes): cuMemGetInfo's free excludes it and
// cuMemCreate cannot use it.
EKVFAKE_API void ekvfake_set_other_used(long long nbytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.other_used = nbytes < 0 ? 0 : static_cast<std::size_t>(nbytes);
}

// Each later call of `fn` (e.g. "cuMemCreate") takes `ns` nanoseconds longer (0 = no delay).
// Returns 0, or -1 for bad arguments.
EKVFAKE_API int ekvfake_set_latency(const char* fn, long long ns) {
  if (fn == nullptr || ns < 0) return -1;
  Latencies& l = latencies();
  std::lock_guard<std::mutex> lock(l.mu);
  if (ns == 0)
    l.ns.erase(fn);
  else
    l.ns[fn] = ns;
  l.any.store(!l.ns.empty());
  return 0;
}
