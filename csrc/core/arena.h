// arena.h — one reserved virtual address range whose granules are backed by physical memory
// on demand.
//
//   map(offset, nbytes)           back every granule of the range (all or nothing)
//   unmap(offset, nbytes, stream) stop backing it; on devices the unmap waits (off the caller's
//                                 path) for events recorded now on `stream` and on every stream
//                                 registered with add_stream (all that may use the memory)
//   trim()                        give cached physical handles back to the backend
//
// Physical handles outlive their mapping: an unmapped granule's handle goes to a reuse cache
// (up to `reuse_bytes`), because creating one is the expensive call on GPUs, two orders of
// magnitude dearer than mapping one (figures: benchmarks/RESULTS.md, "Figures that were in
// code comments"). A granule unmapped on a device is "pending" until its event completes;
// mapping it again before then simply revives it.
//
// Every byte is accounted in ArenaStats and in the device's Budget. All methods are
// thread-safe (one lock per arena) and return a Status; a failed call changes nothing.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/budget.h"
#include "core/status.h"

namespace ekv {

struct ArenaConfig {
  DeviceKind kind = DeviceKind::kHost;
  int device_index = 0;
  std::size_t capacity_bytes = 0;  // rounded up to the granularity
  std::int64_t reuse_bytes = -1;   // cached-handle allowance; -1 = kDefaultReuseBytes
};

// Default cached-handle allowance (capped at the arena's capacity).
constexpr std::size_t kDefaultReuseBytes = std::size_t(64) << 20;
// Pending unmaps are finished by poll()/trim(), by a map that needs their handles, or by
// set_budget; an unmap works the backlog down itself only past this many batches.
constexpr std::size_t kMaxPendingBatches = 64;
// Registered streams per arena (add_stream); each costs one event per unmap.
constexpr std::size_t kMaxStreams = 16;

struct ArenaStats {
  std::size_t granularity = 0;
  std::size_t reserved_bytes = 0;  // address space (capacity); 0 once close() freed the range
  std::size_t mapped_bytes = 0;    // granules the caller has mapped
  std::size_t pending_bytes = 0;   // unmapped by the caller, waiting for the device
  std::size_t cached_bytes = 0;    // handles kept for reuse, not mapped
  std::size_t held_bytes = 0;      // mapped + pending + cached: physical memory held
  std::size_t reuse_bytes = 0;     // cache allowance
  std::uint64_t maps = 0;          // granules mapped (including revived and reused)
  std::uint64_t unmaps = 0;        // granules unmapped by the caller
  std::uint64_t creates = 0;       // physical handles created
  std::uint64_t releases = 0;      // physical handles released
  std::uint64_t reuses = 0;        // maps served from the cache
  std::uint64_t revives = 0;       // maps of a still-pending granule (no driver call)
};

class Arena {
 public:
  static Status create(const ArenaConfig& config, std::unique_ptr<Arena>* out);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  Status map(std::size_t offset, std::size_t nbytes);
  // Like map, but granules of the range already mapped are left as they are (not an error).
  // *newly_mapped = bytes this call mapped. For callers that share granules between objects.
  Status ensure_mapped(std::size_t offset, std::size_t nbytes, std::size_t* newly_mapped);
  // `stream` is an opaque device stream handle (CUstream); nullptr = the default stream. The
  // unmap waits for an event on it and on each registered stream (add_stream).
  Status unmap(std::size_t offset, std::size_t nbytes, void* stream = nullptr);
  // Same, fenced on each of `streams` (deduplicated) and on the registered streams.
  Status unmap(std::size_t offset, std::size_t nbytes, const std::vector<void*>& streams);
  // Streams that may use the arena's memory besides the unmapping caller's: every unmap is
  // ordered after the work queued on each of them (torch's side streams do not order with
  // the default stream, so one event on the caller's stream would not cover their kernels).
  // At most kMaxStreams; adding one twice is a no-op.
  Status add_stream(void* stream);
  Status remove_stream(void* stream);
  std::vector<void*> streams() const;
  Status is_mapped(std::size_t offset, std::size_t nbytes, bool* out) const;
  // Releases every cached handle (and finishes pending unmaps whose device work is done; with
  // wait, waits for the rest first). *released = bytes given back to the backend.
  Status trim(std::size_t* released, bool wait = false);
  // Finishes pending unmaps whose fences completed (handles go to the cache or are released),
  // without touching the cache otherwise. *finished = bytes that left the pending state.
  Status poll(std::size_t* finished);
  Status set_reuse_bytes(std::size_t nbytes);
  // Synchronous copies between host memory and mapped bytes of the range (any alignment;
  // every granule they touch must be mapped), for callers that keep a host copy of what they
  // unmap. Refused like any call on a closed arena or in a forked child.
  Status copy_to_host(void* dst, std::size_t offset, std::size_t nbytes) const;
  Status copy_from_host(std::size_t offset, const void* src, std::size_t nbytes);
  // Releases up to `nbytes` of cached handles if the arena is not busy (never blocks);
  // returns the bytes released. The budget calls it to make room for another arena's map.
  std::size_t try_release_cached(std::size_t nbytes);
  ArenaStats stats() const;
  // Waits for the device, unmaps and releases everything, frees the range. The arena refuses
  // every other call from the first close() on. What the backend would not give back (a
  // failed unmap, release or range free) stays held and counted (held_bytes, reserved_bytes)
  // and the call fails naming it; a later close() retries exactly that. Once everything is
  // given back, close() is a no-op.
  Status close();
  // Fences the backend could not destroy (they leaked in the driver), and the last message.
  std::uint64_t leaked_fences() const { return backend_->leaked_fences(); }
  std::string last_fence_leak() const { return backend_->last_leak(); }

  bool closed() const;
  std::uintptr_t base() const { return base_; }
  std::size_t capacity() const { return capacity_; }
  std::size_t granularity() const { return granularity_; }
  DeviceKind kind() const { return kind_; }
  int device_index() const { return device_index_; }
  const BackendCaps& caps() const { return backend_->caps(); }
  Budget& budget() const { return *budget_; }

 private:
  enum class State : std::uint8_t { kUnmapped, kMapped, kPending };
  struct Granule {
    State state = State::kUnmapped;
    PhysHandle handle = 0;
    std::uint64_t batch = 0;  // serial of the pending batch that holds it (kPending only)
  };
  struct PendingBatch {
    std::uint64_t serial;
    std::vector<Fence> fences;  // one per stream that may have used the granules; done when all are
    std::vector<std::size_t> granules;
  };

  Arena(const ArenaConfig& config, std::unique_ptr<Backend> backend, std::shared_ptr<Budget> budget,
        std::uintptr_t base, std::size_t capacity, std::size_t reuse_bytes, std::vector<Granule> granules);

  Status map_locked(const char* call, std::size_t offset, std::size_t nbytes, bool allow_mapped,
                    std::size_t* newly_mapped);
  Status check_range(const char* call, std::size_t offset, std::size_t nbytes) const;
  Status check_open(const char* call) const;
  Status check_copy(const char* call, std::size_t offset, std::size_t nbytes) const;
  std::uintptr_t addr_of(std::size_t granule) const { return base_ + granule * granularity_; }
  // Finishes pending unmaps whose fences completed (all of them, waiting, if `wait`).
  Status reap_locked(bool wait);
  // An unmapped handle goes to the cache within the allowance, else back to the backend.
  void recycle_locked(PhysHandle handle);
  Status release_cache_locked(std::size_t keep_bytes, std::size_t* released);
  Status charge_locked(std::size_t nbytes, const std::string& what);
  // close()'s giving back, also its retry: unmaps, releases and frees what is still held.
  Status release_closed_locked(Status first_error);

  const DeviceKind kind_;
  const int device_index_;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<Budget> budget_;
  const std::uintptr_t base_;
  const std::size_t capacity_;
  const std::size_t granularity_;

  mutable std::mutex mu_;
  bool closed_ = false;
  // The process that created the arena. After fork() a child shares the host backend's memfd
  // with it (MAP_SHARED): a release there would punch holes in the parent's KV pages, and a
  // child cannot use the parent's CUDA context at all. A child is refused every call, and its
  // close()/destructor lets go without touching the memory (its own exit frees its mappings).
  const pid_t owner_pid_ = getpid();
  bool in_forked_child() const;
  bool closing_ = false;    // close() has begun (unregistering from the budget)
  bool range_held_ = true;  // the address range is reserved (until close() frees it)
  std::size_t reuse_bytes_;
  std::vector<Granule> granules_;
  std::vector<PhysHandle> cache_;
  std::deque<PendingBatch> pending_;
  std::vector<void*> streams_;  // add_stream
  std::uint64_t next_batch_ = 1;
  ArenaStats s_;
};

}  // namespace ekv
