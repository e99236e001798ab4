// segments.h — the allocator's two records and the address space they tile.
//
//   segment — a granule-aligned range of the arena, mapped (or paused) and owned by one tag;
//   block   — a piece of a segment, allocated or free, linked to its address neighbours.
//
// Segments cover part of the arena's reservation; the rest is free address space, kept as
// granule ranges so that a new segment takes the smallest range that fits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include "alloc/free_index.h"
#include "alloc/tag_pause.h"

namespace ekv {

struct FenceRef;  // stream_order.h

struct Segment {
  std::size_t first = 0;  // granule index in the arena
  std::size_t count = 0;  // granules
  TagId tag = 0;
  bool small = false;
  bool paused = false;
  Block* head = nullptr;  // blocks in address order
  std::size_t live = 0;   // allocated blocks
  std::size_t live_bytes = 0;
};

struct Block {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  Segment* seg = nullptr;
  Block* prev = nullptr;  // address neighbours within the segment
  Block* next = nullptr;
  bool allocated = false;
  std::size_t requested = 0;
  void* stream = nullptr;  // allocated: stream of the malloc; free+bound: stream of the free
  // Free and not yet known to be done with by the device: reusable by `stream` only (stream
  // order). No event is recorded at free time; one is, for all such blocks of a stream at
  // once, when a block must go to another stream or be unmapped (see DeviceAllocator).
  bool bound = false;
  std::shared_ptr<FenceRef> fence;  // bound: the event that will say the device is done, once recorded
  Block* pprev = nullptr;           // bound blocks' list (with a fence: pending_, else unfenced_)
  Block* pnext = nullptr;
  bool listed = false;
  bool indexed = false;  // in the free index, at `where`
  FreeIndex::Position where;
};

// The segments of one arena by first granule, and the free granule ranges between them. Owns
// the records: the destructor deletes whatever is left.
class Segments {
 public:
  static constexpr std::size_t kNoRange = std::numeric_limits<std::size_t>::max();
  using Map = std::map<std::size_t, Segment*>;

  Segments(std::uintptr_t base, std::size_t granularity, std::size_t granules);
  ~Segments();
  Segments(const Segments&) = delete;
  Segments& operator=(const Segments&) = delete;

  // Takes `count` granules of free address space: their first granule, or kNoRange.
  std::size_t take_range(std::size_t count);
  void give_range(std::size_t first, std::size_t count);
  // A segment over a taken range, holding one free block that covers it.
  Segment* add(std::size_t first, std::size_t count, TagId tag, bool small);
  // Deletes s and its blocks (none indexed or listed any more) and gives its range back.
  void remove(Segment* s);
  // Makes free block b of large segment s a segment of its own (large blocks are whole
  // granules), so that it can be unmapped while its neighbours stay; returns it.
  Segment* carve(Segment* s, Block* b);
  // No live block and none the device may still be using (no pending free-time event).
  static bool all_free(const Segment* s);

  Map::const_iterator begin() const { return by_first_.begin(); }
  Map::const_iterator end() const { return by_first_.end(); }
  std::size_t size() const { return by_first_.size(); }

 private:
  const std::uintptr_t base_;
  const std::size_t gran_;
  Map by_first_;
  std::map<std::size_t, std::size_t> free_;                     // first granule -> count, unmapped and unowned
  std::set<std::pair<std::size_t, std::size_t>> free_by_size_;  // (count, first)
};

}  // namespace ekv
