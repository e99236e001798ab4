// free_index.h — the free blocks kept mapped for reuse, ordered for best fit.
//
// A free block is keyed by (tag, small or large, stream, size, address). Blocks whose
// free-time event is not known to have completed carry the stream they were freed on: only
// that stream may reuse them (stream order). The others carry kReadyStream: any stream may.
// A lookup takes the smallest fitting block among the caller's stream's and the ready ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <set>

#include "alloc/tag_pause.h"

namespace ekv {

struct Block;

// The stream key of free blocks that any stream may reuse.
constexpr std::uintptr_t kReadyStream = std::numeric_limits<std::uintptr_t>::max();

struct FreeKey {
  bool small;
  TagId tag;
  std::uintptr_t stream;  // kReadyStream: reusable by any stream
  std::size_t size;
  std::uintptr_t addr;
  Block* block;  // not part of the order
  bool operator<(const FreeKey& o) const;
};

// Intrusive: a block remembers its own position (Block::indexed, Block::where), so the fields
// its key is made of must not change while it is indexed.
class FreeIndex {
 public:
  using Position = std::set<FreeKey>::iterator;

  void insert(Block* b);
  void erase(Block* b);  // no-op if b is not indexed
  // The smallest free block of at least `size` bytes that `stream` may reuse, or nullptr.
  Block* find(bool small, TagId tag, void* stream, std::size_t size) const;

 private:
  std::set<FreeKey> set_;
};

}  // namespace ekv
