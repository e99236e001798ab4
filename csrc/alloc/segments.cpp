// segments.cpp — see segments.h.
#include "alloc/segments.h"

namespace ekv {

Segments::Segments(std::uintptr_t base, std::size_t granularity, std::size_t granules)
    : base_(base), gran_(granularity) {
  give_range(0, granules);
}

Segments::~Segments() {
  for (auto& kv : by_first_) {
    for (Block* b = kv.second->head; b != nullptr;) {
      Block* n = b->next;
      delete b;
      b = n;
    }
    delete kv.second;
  }
}

std::size_t Segments::take_range(std::size_t count) {
  auto it = free_by_size_.lower_bound({count, 0});
  if (it == free_by_size_.end()) return kNoRange;
  const std::size_t have = it->first, first = it->second;
  free_by_size_.erase(it);
  free_.erase(first);
  if (have > count) {
    free_[first + count] = have - count;
    free_by_size_.insert({have - count, first + count});
  }
  return first;
}

void Segments::give_range(std::size_t first, std::size_t count) {
  auto right = free_.find(first + count);
  if (right != free_.end()) {
    free_by_size_.erase({right->second, right->first});
    count += right->second;
    free_.erase(right);
  }
  auto left = free_.lower_bound(first);
  if (left != free_.begin()) {
    --left;
    if (left->first + left->second == first) {
      free_by_size_.erase({left->second, left->first});
      first = left->first;
      count += left->second;
      free_.erase(left);
    }
  }
  free_[first] = count;
  free_by_size_.insert({count, first});
}

Segment* Segments::add(std::size_t first, std::size_t count, TagId tag, bool small) {
  Segment* s = new Segment();
  s->first = first;
  s->count = count;
  s->tag = tag;
  s->small = small;
  Block* b = new Block();
  b->addr = base_ + first * gran_;
  b->size = count * gran_;
  b->seg = s;
  s->head = b;
  by_first_[first] = s;
  return s;
}

void Segments::remove(Segment* s) {
  for (Block* b = s->head; b != nullptr;) {
    Block* n = b->next;
    delete b;
    b = n;
  }
  by_first_.erase(s->first);
  give_range(s->first, s->count);
  delete s;
}

Segment* Segments::carve(Segment* s, Block* b) {
  const std::size_t bfirst = (b->addr - base_) / gran_;
  const std::size_t bcount = b->size / gran_;
  if (b->next != nullptr) {
    Segment* r = new Segment();
    r->first = bfirst + bcount;
    r->count = s->first + s->count - r->first;
    r->tag = s->tag;
    r->head = b->next;
    b->next->prev = nullptr;
    for (Block* x = r->head; x != nullptr; x = x->next) {
      x->seg = r;
      if (x->allocated) {
        r->live += 1;
        r->live_bytes += x->size;
      }
    }
    s->live -= r->live;
    s->live_bytes -= r->live_bytes;
    b->next = nullptr;
    by_first_[r->first] = r;
  }
  if (b->prev == nullptr) {
    s->count = bcount;
    return s;
  }
  Segment* m = new Segment();
  m->first = bfirst;
  m->count = bcount;
  m->tag = s->tag;
  m->head = b;
  b->prev->next = nullptr;
  b->prev = nullptr;
  b->seg = m;
  s->count = bfirst - s->first;
  by_first_[bfirst] = m;
  return m;
}

bool Segments::all_free(const Segment* s) {
  if (s->live != 0) return false;
  for (const Block* b = s->head; b != nullptr; b = b->next) {
    if (b->bound) return false;
  }
  return true;
}

}  // namespace ekv
