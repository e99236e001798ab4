// backend.h — the whole contract between the core and a memory primitive.
//
// Vocabulary (fixed once, see docs/INTERFACES.md):
//   address range — one reserved virtual range (an Arena owns one);
//   granule       — the unit a backend maps: `granularity` bytes of virtual space;
//   handle        — one physical allocation of one granule, created once and mapped at any
//                   granule-aligned address of a range, possibly many times over its life.
//
// The calls mirror the CUDA driver VMM API so that everything above a backend is the same
// code on CPU and GPU. A backend holds no accounting and no policy: the Arena does that. The
// one count it keeps is of fences it failed to destroy (see leaked_fences).
// Every call returns a Status; a failed call leaves the backend as it was.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"

namespace ekv {

using PhysHandle = std::uint64_t;
// Opaque marker of "the device has finished everything queued so far on a stream".
using Fence = void*;

enum class DeviceKind { kHost = 0, kCuda = 1 };

struct BackendCaps {
  std::size_t granularity = 0;   // bytes per granule; addresses and sizes are multiples of it
  bool deferred_unmap = false;   // unmap must wait for a fence (device may still use the memory)
  bool host_accessible = false;  // mapped addresses can be dereferenced by the CPU
  std::string name;              // "host", "cuda", "cuda(fake)"
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const BackendCaps& caps() const = 0;

  // Reserve `nbytes` (multiple of granularity) of address space, aligned to granularity.
  virtual Status reserve(std::size_t nbytes, std::uintptr_t* addr) = 0;
  virtual Status free_range(std::uintptr_t addr, std::size_t nbytes) = 0;

  // Physical memory for one granule; kOutOfMemory when the device has none left.
  virtual Status create(std::size_t nbytes, PhysHandle* out) = 0;
  // Whether `nbytes` more physical memory can be created now; the arena asks once per map,
  // before any create. Devices whose create fails cleanly when memory runs out need not
  // answer; the host does, because its commit past RAM invokes the OOM killer instead.
  virtual Status check_commit(std::size_t nbytes) {
    (void)nbytes;
    return Status::Ok();
  }
  // Map (and make read-write) a handle at addr; on failure nothing stays mapped.
  virtual Status map(std::uintptr_t addr, std::size_t nbytes, PhysHandle handle) = 0;
  // Map handles[k] (one granule each) at addr + k * granularity for k < count, and make the
  // whole run read-write; on failure nothing of the run stays mapped. The default maps granule
  // by granule; a backend whose access call may span several mappings overrides it with one
  // access call per run (on CUDA that call costs as much as the map itself).
  virtual Status map_range(std::uintptr_t addr, const PhysHandle* handles, std::size_t count) {
    const std::size_t g = caps().granularity;
    for (std::size_t k = 0; k < count; ++k) {
      Status st = map(addr + k * g, g, handles[k]);
      if (!st.ok()) {
        // Best effort: the map failure is the error to report.
        for (std::size_t j = k; j > 0; --j) unmap(addr + (j - 1) * g, g).IgnoreError();
        return st;
      }
    }
    return Status::Ok();
  }
  virtual Status unmap(std::uintptr_t addr, std::size_t nbytes) = 0;
  virtual Status release(PhysHandle handle, std::size_t nbytes) = 0;

  // Fences: recorded on `stream` (opaque; nullptr = the device's default stream) when a
  // granule is unmapped, so that the unmap waits for queued device work and nothing else.
  // Backends whose memory is only touched synchronously (host) return a null fence.
  virtual Status record_fence(void* stream, Fence* out) {
    (void)stream;
    *out = nullptr;
    return Status::Ok();
  }
  virtual Status fence_done(Fence fence, bool* done) {
    (void)fence;
    *done = true;
    return Status::Ok();
  }
  virtual Status fence_wait(Fence fence) {
    (void)fence;
    return Status::Ok();
  }
  // A fence that cannot be destroyed stays alive in the driver. Its callers are done with it
  // and several (reaping inside an unrelated map or poll) have nobody to tell, so the backend
  // counts each such leak itself and keeps the last message (leaked_fences, last_leak).
  virtual void destroy_fence(Fence fence) { (void)fence; }
  virtual std::uint64_t leaked_fences() const { return 0; }
  virtual std::string last_leak() const { return std::string(); }
  // Waits for all work queued on the device by anyone, on every stream. Only for teardown
  // (closing an arena whose granules are still mapped: no fence says who last used them);
  // release paths wait on fences instead.
  virtual Status synchronize() { return Status::Ok(); }
  // Waits for the work queued on one stream: what a fence recorded there now would tell, for
  // a caller that could not record one.
  virtual Status synchronize_stream(void* stream) {
    (void)stream;
    return Status::Ok();
  }

  // Synchronous copies between mapped memory (`src`/`dst`: addresses inside a mapped range)
  // and host memory, for the allocator's pause backups; done when the call returns.
  virtual Status copy_to_host(void* dst, std::uintptr_t src, std::size_t nbytes) = 0;
  virtual Status copy_from_host(std::uintptr_t dst, const void* src, std::size_t nbytes) = 0;

  // Free and total physical memory of the device as the backend's primitive sees it.
  virtual Status device_memory(std::size_t* free_bytes, std::size_t* total_bytes) = 0;
};

// Factories. `device_index` is ignored by the host backend. The host backend's physical
// memory lives in one memfd sized `max_bytes` (the most one arena can ever hold).
Status make_host_backend(std::size_t max_bytes, std::unique_ptr<Backend>* out);
Status make_cuda_backend(int device_index, std::unique_ptr<Backend>* out);

}  // namespace ekv
