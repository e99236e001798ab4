// device_allocator.h — a general malloc/free over one arena per device, for torch's
// CUDAPluggableAllocator.
//
// Each device (-1 = host backend, N = cuda:N) has one DeviceAllocator over one Arena that
// reserves address space for the most the device could hold. Small requests (<= kSmallLimit)
// are packed into one-granule segments; large ones get segments of whole granules of their
// own. Freed blocks stay mapped for reuse (best fit, split and merged with free neighbours)
// until trim(), a limit, or a pause gives the granules back.
//
// Built from one piece per concept: segments.h (segments, blocks, address space),
// free_index.h (reuse by best fit), stream_order.h (free-time events; the free path records
// one and never synchronizes the device unless it cannot be had), tag_pause.h (pause and
// resume of a tag's segments). Errors are Status values; nothing here throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "alloc/free_index.h"
#include "alloc/segments.h"
#include "alloc/stream_order.h"
#include "alloc/tag_pause.h"
#include "core/arena.h"
#include "core/backend.h"
#include "core/status.h"

namespace ekv {

// Requests up to this size share one-granule segments (capped at half a granule).
constexpr std::size_t kSmallLimit = std::size_t(1) << 20;
// Every block is a multiple of this, and so aligned to it.
constexpr std::size_t kBlockAlign = 512;
// Default address space reserved on the host; a cuda device reserves twice its memory.
constexpr std::size_t kHostReserveBytes = std::size_t(128) << 30;

struct TagStats {
  std::string tag;
  std::size_t allocated_bytes = 0;  // block sizes of live allocations
  std::size_t requested_bytes = 0;  // sizes the callers asked for
  std::size_t mapped_bytes = 0;     // segments of this tag that are mapped
  std::size_t paused_bytes = 0;     // segments unmapped by pause, addresses kept
  std::size_t backup_bytes = 0;     // host copies held for resume
  std::uint64_t blocks = 0;         // live allocations
  bool paused = false;
};

struct AllocatorStats {
  int device = -1;
  std::size_t granularity = 0;
  std::size_t reserved_bytes = 0;      // address space of the arena
  std::size_t mapped_bytes = 0;        // segments mapped (live + cached)
  std::size_t allocated_bytes = 0;     // block sizes of live allocations (paused ones too)
  std::size_t requested_bytes = 0;     // sizes the callers asked for
  std::size_t cached_bytes = 0;        // mapped but not allocated: free blocks kept for reuse
  std::size_t pending_free_bytes = 0;  // free blocks whose free-time event is not known done
  std::size_t paused_bytes = 0;        // unmapped by pause()
  std::size_t backup_bytes = 0;        // host copies held by pause(backup=true)
  std::size_t peak_allocated_bytes = 0;
  std::size_t peak_mapped_bytes = 0;
  std::optional<std::size_t> limit_bytes;  // nullopt = no allocator limit
  std::uint64_t mallocs = 0, frees = 0, failed_mallocs = 0, failed_frees = 0;
  std::uint64_t maps = 0, unmaps = 0;     // granules mapped/unmapped by this allocator
  std::uint64_t free_event_failures = 0;  // handoffs whose event could not be recorded (synchronized instead)
  std::uint64_t events_recorded = 0;      // events recorded for freed blocks (one per stream per handoff)
  std::uint64_t leaked_events = 0;        // events the driver would not destroy (this + its arena)
  std::uint64_t live_blocks = 0, segments = 0;
  std::vector<TagStats> tags;
};

struct BlockInfo {
  std::uintptr_t address = 0;
  std::size_t size = 0;        // requested
  std::size_t block_size = 0;  // what it occupies
  std::string tag;
  std::uintptr_t stream = 0;  // stream of the malloc
  bool paused = false;
  bool small = false;
};

class DeviceAllocator {
 public:
  // device -1 = host backend; `reserve_bytes` 0 = the default for the device.
  static Status create(int device, std::size_t reserve_bytes, std::unique_ptr<DeviceAllocator>* out);
  ~DeviceAllocator();
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  Status malloc(std::size_t size, void* stream, TagId tag, void** out);
  Status free(void* ptr, std::size_t size, void* stream);
  // Unmaps every cached granule (waiting on free-time events only) and releases the physical
  // memory; *released = bytes given back to the backend.
  Status trim(std::size_t* released);
  // Cap on mapped bytes; lowering it below use gives cached granules back and fails later
  // mallocs that would pass it, leaving live blocks alone.
  Status set_limit(std::optional<std::size_t> limit);
  // Defined in tag_pause.cpp.
  Status pause(TagId tag, bool backup, std::size_t* released);
  Status resume(TagId tag);
  AllocatorStats stats() const;
  std::vector<BlockInfo> snapshot() const;
  int device() const { return device_; }
  // Marks the allocator closed if nothing is allocated or paused (later calls fail with
  // kUnavailable, so the caller can drop it); else kInvalidArgument and nothing changes.
  Status close_if_idle();
  // After close_if_idle: gives the arena (mappings, handles, address range) back. A failure
  // names what is still held; calling it again retries that.
  Status close_arena();

 private:
  // Reports, at the end of a call and under its lock, the events leaked during it.
  struct LeakReport {
    DeviceAllocator* d;
    ~LeakReport() { d->report_leaks(); }
  };

  DeviceAllocator(int device, std::unique_ptr<Arena> arena, std::unique_ptr<Backend> fences);

  std::string where() const;
  Block* take(Block* b, std::size_t bsize, std::size_t requested, void* stream);
  Block* coalesce(Block* b);
  void promote_done(bool wait);
  void promote_oldest();
  // Records one event per stream on which bound blocks without one were freed, and moves
  // them to the pending list: the handoff to other streams, or to an unmap.
  void fence_unfenced();
  void unlist(Block* b);
  void enlist(Block* b);
  Status grow(bool small, TagId tag, std::size_t bsize, Block** out);
  std::size_t release_free_segments(bool carve);
  Status release_segment(Segment* s);
  void report_leaks();
  void note_mapped(std::ptrdiff_t delta);

  const int device_;
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<Backend> fences_;  // null on the host: its memory is touched synchronously
  const std::size_t gran_;
  const std::size_t small_limit_;

  mutable std::mutex mu_;
  FreeIndex index_;
  std::unordered_map<std::uintptr_t, Block*> live_;
  Segments segs_;
  PendingList pending_;     // bound free blocks with an event recorded, waiting for it
  PendingList unfenced_;    // bound free blocks with no event yet (reusable by their stream)
  std::uint64_t pass_ = 0;  // promotion passes, so a shared event is queried once per pass
  std::unordered_map<TagId, TagState> tags_;
  std::optional<std::size_t> limit_;
  bool closed_ = false;
  std::size_t mapped_ = 0, allocated_ = 0, requested_ = 0, paused_ = 0, paused_live_ = 0;
  std::size_t peak_allocated_ = 0, peak_mapped_ = 0;
  std::uint64_t mallocs_ = 0, frees_ = 0, failed_mallocs_ = 0, failed_frees_ = 0, maps_ = 0, unmaps_ = 0;
  std::uint64_t free_event_failures_ = 0, events_recorded_ = 0;
  std::uint64_t leaks_seen_own_ = 0, leaks_seen_arena_ = 0;  // leaked_fences() already reported
};

// "0x7f00..." for messages.
std::string hex_text(std::uintptr_t v);

}  // namespace ekv
