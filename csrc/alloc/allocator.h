// allocator.h — a general malloc/free over arenas, for torch's CUDAPluggableAllocator.
//
// Vocabulary (on top of docs/INTERFACES.md):
//   segment — a granule-aligned range of a device's arena that is mapped and owned by one tag;
//   block   — a piece of a segment: handed out by malloc, or free and kept for reuse.
//
// Each device (-1 = host backend, N = cuda:N) has one DeviceAllocator over one Arena that
// reserves address space for the most the device could hold. Small requests (<= kSmallLimit)
// are packed into one-granule segments; large ones get segments of whole granules of their
// own. Freed blocks stay mapped for reuse (best fit, split and merged with free neighbours)
// until trim(), a limit, or a pause gives the granules back.
//
// Stream order: a block freed on stream S is reusable at once by S; for any other stream, and
// for unmapping, only once an event recorded on S at free time has completed. The free path
// records that event and never synchronizes the device, unless the event cannot be had: torch
// never retries a free, so it then synchronizes S (else the device) and frees the block all
// the same; if even that fails the block stays reusable by S only until trim() synchronizes.
//
// Tags: every allocation carries the calling thread's current tag (set_thread_tag); segments
// never mix tags, so pause(tag) can unmap a tag's granules while keeping their addresses and
// resume(tag) maps them again (restoring the bytes from a host copy when asked to keep one).
//
// Errors are Status values. Allocator (the process-wide door used by the C ABI) turns them
// into a null pointer plus a message readable through last_error(); nothing here throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

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

using TagId = std::uint32_t;

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
  std::size_t reserved_bytes = 0;        // address space of the arena
  std::size_t mapped_bytes = 0;          // segments mapped (live + cached)
  std::size_t allocated_bytes = 0;       // block sizes of live allocations (paused ones too)
  std::size_t requested_bytes = 0;       // sizes the callers asked for
  std::size_t cached_bytes = 0;          // mapped but not allocated: free blocks kept for reuse
  std::size_t pending_free_bytes = 0;    // free blocks whose free-time event is not known done
  std::size_t paused_bytes = 0;          // unmapped by pause()
  std::size_t backup_bytes = 0;          // host copies held by pause(backup=true)
  std::size_t peak_allocated_bytes = 0;
  std::size_t peak_mapped_bytes = 0;
  std::optional<std::size_t> limit_bytes;  // nullopt = no allocator limit
  std::uint64_t mallocs = 0, frees = 0, failed_mallocs = 0, failed_frees = 0;
  std::uint64_t maps = 0, unmaps = 0;    // granules mapped/unmapped by this allocator
  std::uint64_t free_event_failures = 0;  // frees whose free-time event could not be recorded
  std::uint64_t leaked_events = 0;       // events the driver would not destroy (this + its arena)
  std::uint64_t live_blocks = 0, segments = 0;
  std::vector<TagStats> tags;
};

struct BlockInfo {
  std::uintptr_t address = 0;
  std::size_t size = 0;        // requested
  std::size_t block_size = 0;  // what it occupies
  std::string tag;
  std::uintptr_t stream = 0;   // stream of the malloc
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
  struct FenceRef;
  struct LeakReport;
  struct Segment;
  struct Block;
  struct FreeKey {
    bool small;
    TagId tag;
    std::uintptr_t stream;  // kReadyStream: reusable by any stream
    std::size_t size;
    std::uintptr_t addr;
    Block* block;  // not part of the order
    bool operator<(const FreeKey& o) const;
  };
  struct TagState {
    bool paused = false;
    std::unordered_map<Block*, std::vector<unsigned char>> backups;
    std::size_t backup_bytes = 0;
  };
  DeviceAllocator(int device, std::unique_ptr<Arena> arena, std::unique_ptr<Backend> fences);

  std::string where() const;
  FreeKey key_of(const Block* b) const;
  void index_insert(Block* b);
  void index_erase(Block* b);
  Block* find_free(bool small, TagId tag, void* stream, std::size_t size);
  Block* take(Block* b, std::size_t bsize, std::size_t requested, void* stream);
  Block* coalesce(Block* b);
  void pending_push(Block* b);
  void pending_unlink(Block* b);
  void promote_done(bool wait);
  void promote_oldest();
  Status grow(bool small, TagId tag, std::size_t bsize, Block** out);
  std::size_t release_free_segments(bool carve);
  bool segment_free(const Segment* s) const;
  Status release_segment(Segment* s);
  Segment* carve(Segment* s, Block* b);
  Status wait_streams(const std::vector<void*>& streams);
  Status wait_fence(FenceRef* f);
  void report_leaks();
  std::size_t va_alloc(std::size_t count);  // returns SIZE_MAX if none
  void va_free(std::size_t first, std::size_t count);
  void note_mapped(std::ptrdiff_t delta);

  const int device_;
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<Backend> fences_;  // null on the host: its memory is touched synchronously
  const std::size_t gran_;
  const std::size_t small_limit_;

  mutable std::mutex mu_;
  std::set<FreeKey> free_;
  std::unordered_map<std::uintptr_t, Block*> live_;
  std::map<std::size_t, Segment*> segments_;  // by first granule
  std::map<std::size_t, std::size_t> va_free_;  // first granule -> count, unmapped and unowned
  std::set<std::pair<std::size_t, std::size_t>> va_by_size_;  // (count, first)
  Block* pending_head_ = nullptr;  // free blocks waiting on their free-time event, oldest first
  Block* pending_tail_ = nullptr;
  std::unordered_map<TagId, TagState> tags_;
  std::optional<std::size_t> limit_;
  bool closed_ = false;
  std::size_t mapped_ = 0, allocated_ = 0, requested_ = 0, paused_ = 0, paused_live_ = 0;
  std::size_t pending_free_ = 0, peak_allocated_ = 0, peak_mapped_ = 0;
  std::uint64_t mallocs_ = 0, frees_ = 0, failed_mallocs_ = 0, failed_frees_ = 0, maps_ = 0, unmaps_ = 0;
  std::uint64_t free_event_failures_ = 0;
  std::uint64_t leaks_seen_own_ = 0, leaks_seen_arena_ = 0;  // leaked_fences() already reported
};

// The process-wide door: per-device allocators, tag names, the last error. Reached from the C
// ABI (which has no handle to pass) and from the bindings; never destroyed, so frees that
// arrive while the process exits find it alive.
class Allocator {
 public:
  static Allocator& instance();

  // C ABI semantics: never throw; failures return null / change nothing and set last_error.
  void* malloc(std::size_t size, int device, void* stream) noexcept;
  void free(void* ptr, std::size_t size, int device, void* stream) noexcept;

  // The device's allocator, created on first use. Shared: close() may drop it meanwhile.
  Status device(int device, std::shared_ptr<DeviceAllocator>* out);
  std::vector<std::shared_ptr<DeviceAllocator>> devices();
  // Drops the device's allocator (its arena and address reservation) if nothing is allocated
  // or paused there; the next malloc on the device starts a fresh one. An arena the driver
  // would not give back whole is kept aside and named in the error; the next close(device)
  // retries it.
  Status close(int device);
  // Devices with such an arena kept aside.
  std::vector<int> unclosed_devices();
  // Address space each device reserves when first used (0 = default). Only before first use.
  void set_reserve_bytes(std::size_t nbytes);

  TagId tag_id(const std::string& name);
  std::string tag_name(TagId id);
  bool find_tag(const std::string& name, TagId* id);
  // The tag of allocations made by this thread from now on ("" = untagged).
  static TagId thread_tag();
  static void set_thread_tag(TagId id);

  void record_error(const std::string& message);
  std::optional<std::string> last_error(bool clear);

 private:
  Allocator();
  std::mutex mu_;
  std::map<int, std::shared_ptr<DeviceAllocator>> devices_;
  std::multimap<int, std::shared_ptr<DeviceAllocator>> unclosed_;  // dropped, arena not all given back
  std::size_t reserve_bytes_ = 0;
  std::mutex tags_mu_;
  std::vector<std::string> tag_names_;
  std::unordered_map<std::string, TagId> tag_ids_;
  std::mutex error_mu_;
  std::optional<std::string> last_error_;
};

}  // namespace ekv
