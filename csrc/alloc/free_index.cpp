// free_index.cpp — see free_index.h.
#include "alloc/free_index.h"

#include "alloc/segments.h"

namespace ekv {

bool FreeKey::operator<(const FreeKey& o) const {
  if (tag != o.tag) return tag < o.tag;
  if (small != o.small) return small < o.small;
  if (stream != o.stream) return stream < o.stream;
  if (size != o.size) return size < o.size;
  return addr < o.addr;
}

void FreeIndex::insert(Block* b) {
  std::uintptr_t s = b->bound ? reinterpret_cast<std::uintptr_t>(b->stream) : kReadyStream;
  b->where = set_.insert(FreeKey{b->seg->small, b->seg->tag, s, b->size, b->addr, b}).first;
  b->indexed = true;
}

void FreeIndex::erase(Block* b) {
  if (!b->indexed) return;
  set_.erase(b->where);
  b->indexed = false;
}

Block* FreeIndex::find(bool small, TagId tag, void* stream, std::size_t size) const {
  Block* best = nullptr;
  for (std::uintptr_t s : {reinterpret_cast<std::uintptr_t>(stream), kReadyStream}) {
    auto it = set_.lower_bound(FreeKey{small, tag, s, size, 0, nullptr});
    if (it == set_.end() || it->small != small || it->tag != tag || it->stream != s) continue;
    if (best == nullptr || it->size < best->size) best = it->block;
  }
  return best;
}

}  // namespace ekv
