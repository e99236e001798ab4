// allocator.cpp — blocks and segments over one arena per device; see allocator.h.
#include "alloc/allocator.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <new>
#include <tuple>
#include <utility>

namespace ekv {
namespace {

// Free blocks keyed with this stream may be reused by any stream.
constexpr std::uintptr_t kReadyStream = std::numeric_limits<std::uintptr_t>::max();
constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();

thread_local TagId t_thread_tag = 0;

std::string hex(std::uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string device_text(int device) { return device < 0 ? std::string("cpu") : "cuda:" + std::to_string(device); }

// Rounds up, or returns kNone when the result would not fit.
std::size_t round_up(std::size_t n, std::size_t a) {
  if (n > kNone - (a - 1)) return kNone;
  return (n + a - 1) / a * a;
}

}  // namespace

// ---- pieces ---------------------------------------------------------------------------------

// A free-time event shared by the blocks split from (or merged into) one freed block. A null
// fence stands for an event that could not be recorded: done only once the device is
// synchronized (wait_fence), reusable by its stream meanwhile, as stream order allows.
struct DeviceAllocator::FenceRef {
  FenceRef(Backend* b, Fence f) : backend(b), fence(f) {}
  ~FenceRef() {
    if (fence != nullptr) backend->destroy_fence(fence);
  }
  Backend* backend;
  Fence fence;
  bool done = false;
};

// Reports, at the end of a call and under its lock, the events leaked during it.
struct DeviceAllocator::LeakReport {
  DeviceAllocator* d;
  ~LeakReport() { d->report_leaks(); }
};

struct DeviceAllocator::Segment {
  std::size_t first = 0;  // granule index in the arena
  std::size_t count = 0;  // granules
  TagId tag = 0;
  bool small = false;
  bool paused = false;
  Block* head = nullptr;   // blocks in address order
  std::size_t live = 0;    // allocated blocks
  std::size_t live_bytes = 0;
};

struct DeviceAllocator::Block {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  Segment* seg = nullptr;
  Block* prev = nullptr;  // address neighbours within the segment
  Block* next = nullptr;
  bool allocated = false;
  std::size_t requested = 0;
  void* stream = nullptr;            // allocated: stream of the malloc; free+fence: stream of the free
  std::shared_ptr<FenceRef> fence;   // free and not yet known to be done with by the device
  Block* pprev = nullptr;            // pending list (free blocks with a fence), oldest first
  Block* pnext = nullptr;
  bool listed = false;
  bool indexed = false;              // in the free index, at `where`
  std::set<FreeKey>::iterator where;
};

bool DeviceAllocator::FreeKey::operator<(const FreeKey& o) const {
  if (tag != o.tag) return tag < o.tag;
  if (small != o.small) return small < o.small;
  if (stream != o.stream) return stream < o.stream;
  if (size != o.size) return size < o.size;
  return addr < o.addr;
}

// ---- creation -------------------------------------------------------------------------------

Status DeviceAllocator::create(int device, std::size_t reserve_bytes, std::unique_ptr<DeviceAllocator>* out) {
  if (device < -1) {
    return InvalidArgument("allocator: device " + std::to_string(device) + " is not -1 (host) or a cuda index");
  }
  ArenaConfig cfg;
  std::unique_ptr<Backend> fences;
  std::size_t capacity = reserve_bytes;
  if (device == -1) {
    cfg.kind = DeviceKind::kHost;
    cfg.device_index = 0;
    if (capacity == 0) capacity = kHostReserveBytes;
  } else {
    cfg.kind = DeviceKind::kCuda;
    cfg.device_index = device;
    EKV_RETURN_IF_ERROR(make_cuda_backend(device, &fences));
    if (capacity == 0) {
      // Room for the whole device twice over, so fragmentation of addresses never binds first.
      std::size_t free_b = 0, total_b = 0;
      capacity = fences->device_memory(&free_b, &total_b).ok() && total_b > 0 ? 2 * total_b : std::size_t(64) << 30;
    }
  }
  cfg.capacity_bytes = capacity;
  std::unique_ptr<Arena> arena;
  EKV_RETURN_IF_ERROR(Arena::create(cfg, &arena));
  out->reset(new DeviceAllocator(device, std::move(arena), std::move(fences)));
  return Status::Ok();
}

DeviceAllocator::DeviceAllocator(int device, std::unique_ptr<Arena> arena, std::unique_ptr<Backend> fences)
    : device_(device),
      arena_(std::move(arena)),
      fences_(std::move(fences)),
      gran_(arena_->granularity()),
      small_limit_(std::min(kSmallLimit, arena_->granularity() / 2)) {
  va_free(0, arena_->capacity() / gran_);
}

DeviceAllocator::~DeviceAllocator() {
  // Only reached if creation is undone; the process-wide allocators live until exit.
  for (auto& kv : segments_) {
    for (Block* b = kv.second->head; b != nullptr;) {
      Block* n = b->next;
      delete b;
      b = n;
    }
    delete kv.second;
  }
}

std::string DeviceAllocator::where() const { return device_text(device_); }

// ---- free index and pending list ------------------------------------------------------------

DeviceAllocator::FreeKey DeviceAllocator::key_of(const Block* b) const {
  std::uintptr_t s = b->fence ? reinterpret_cast<std::uintptr_t>(b->stream) : kReadyStream;
  return FreeKey{b->seg->small, b->seg->tag, s, b->size, b->addr, const_cast<Block*>(b)};
}

void DeviceAllocator::index_insert(Block* b) {
  b->where = free_.insert(key_of(b)).first;
  b->indexed = true;
}

void DeviceAllocator::index_erase(Block* b) {
  if (!b->indexed) return;
  free_.erase(b->where);
  b->indexed = false;
}

void DeviceAllocator::pending_push(Block* b) {
  b->pprev = pending_tail_;
  b->pnext = nullptr;
  if (pending_tail_ != nullptr) pending_tail_->pnext = b; else pending_head_ = b;
  pending_tail_ = b;
  b->listed = true;
  pending_free_ += b->size;
}

void DeviceAllocator::pending_unlink(Block* b) {
  if (b->pprev != nullptr) b->pprev->pnext = b->pnext; else pending_head_ = b->pnext;
  if (b->pnext != nullptr) b->pnext->pprev = b->pprev; else pending_tail_ = b->pprev;
  b->pprev = b->pnext = nullptr;
  b->listed = false;
  pending_free_ -= b->size;
}

DeviceAllocator::Block* DeviceAllocator::find_free(bool small, TagId tag, void* stream, std::size_t size) {
  Block* best = nullptr;
  for (std::uintptr_t s : {reinterpret_cast<std::uintptr_t>(stream), kReadyStream}) {
    auto it = free_.lower_bound(FreeKey{small, tag, s, size, 0, nullptr});
    if (it == free_.end() || it->small != small || it->tag != tag || it->stream != s) continue;
    if (best == nullptr || it->size < best->size) best = it->block;
  }
  return best;
}

// Turns free block b into an allocation of bsize bytes; the rest stays free, in the same state.
DeviceAllocator::Block* DeviceAllocator::take(Block* b, std::size_t bsize, std::size_t requested, void* stream) {
  index_erase(b);
  if (b->listed) pending_unlink(b);
  const std::size_t min_split = b->seg->small ? kBlockAlign : gran_;
  if (b->size - bsize >= min_split) {
    Block* r = new Block();
    r->addr = b->addr + bsize;
    r->size = b->size - bsize;
    r->seg = b->seg;
    r->prev = b;
    r->next = b->next;
    if (b->next != nullptr) b->next->prev = r;
    b->next = r;
    r->stream = b->stream;
    r->fence = b->fence;
    b->size = bsize;
    if (r->fence) pending_push(r);
    index_insert(r);
  }
  b->fence.reset();
  b->allocated = true;
  b->requested = requested;
  b->stream = stream;
  b->seg->live += 1;
  b->seg->live_bytes += b->size;
  live_[b->addr] = b;
  allocated_ += b->size;
  requested_ += requested;
  peak_allocated_ = std::max(peak_allocated_, allocated_);
  return b;
}

// Merges free block b (in neither the index nor the pending list) with free neighbours in the
// same state: both reusable by any stream, or both freed on the same stream (then the merged
// block waits for b's event, the newer one: events on one stream complete in order).
DeviceAllocator::Block* DeviceAllocator::coalesce(Block* b) {
  auto compatible = [b](const Block* o) {
    if (o == nullptr || o->allocated) return false;
    if (!b->fence && !o->fence) return true;
    return b->fence && o->fence && b->stream == o->stream;
  };
  while (compatible(b->next)) {
    Block* n = b->next;
    index_erase(n);
    if (n->listed) pending_unlink(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next != nullptr) n->next->prev = b;
    delete n;
  }
  while (compatible(b->prev)) {
    Block* p = b->prev;
    index_erase(p);
    if (p->listed) pending_unlink(p);
    p->size += b->size;
    p->next = b->next;
    if (b->next != nullptr) b->next->prev = p;
    p->fence = std::move(b->fence);
    p->stream = b->stream;
    delete b;
    b = p;
  }
  return b;
}

// Free blocks whose free-time event has completed become reusable by any stream (waiting for
// the events first if `wait`: an event wait, never a device-wide synchronize).
void DeviceAllocator::promote_done(bool wait) {
  bool synced = false;  // a device synchronize (for a block without an event) finished everything
  for (Block* b = pending_head_; b != nullptr;) {
    Block* next = b->pnext;
    FenceRef* f = b->fence.get();
    if (!f->done) {
      if (synced) {
        f->done = true;
      } else if (wait) {
        f->done = wait_fence(f).ok();
        synced = f->done && f->fence == nullptr;
      } else if (f->fence != nullptr) {
        bool d = false;
        f->done = fences_->fence_done(f->fence, &d).ok() && d;
      }
    }
    if (f->done) {
      index_erase(b);
      pending_unlink(b);
      b->fence.reset();
      b->stream = nullptr;
      b = coalesce(b);  // only with ready neighbours, which are not on the pending list
      index_insert(b);
    }
    b = next;
  }
}

// Promotes the oldest pending blocks whose events have completed: up to four, stopping at the
// first not done (one query each, no wait), so the list drains faster than frees fill it.
// Blocks without an event (they wait for a synchronize) are stepped over, a few at most, so
// that they do not stall the draining behind them.
void DeviceAllocator::promote_oldest() {
  int promoted = 0, skipped = 0;
  for (Block* b = pending_head_; b != nullptr && promoted < 4;) {
    Block* next = b->pnext;
    FenceRef* f = b->fence.get();
    if (!f->done && f->fence == nullptr) {
      if (++skipped > 4) return;
      b = next;
      continue;
    }
    if (!f->done) {
      bool d = false;
      f->done = fences_->fence_done(f->fence, &d).ok() && d;
      if (!f->done) return;
    }
    index_erase(b);
    pending_unlink(b);
    b->fence.reset();
    b->stream = nullptr;
    index_insert(coalesce(b));  // merges only with ready neighbours: `next` is still pending
    ++promoted;
    b = next;
  }
}

// ---- address space --------------------------------------------------------------------------

std::size_t DeviceAllocator::va_alloc(std::size_t count) {
  auto it = va_by_size_.lower_bound({count, 0});
  if (it == va_by_size_.end()) return kNone;
  const std::size_t have = it->first, first = it->second;
  va_by_size_.erase(it);
  va_free_.erase(first);
  if (have > count) {
    va_free_[first + count] = have - count;
    va_by_size_.insert({have - count, first + count});
  }
  return first;
}

void DeviceAllocator::va_free(std::size_t first, std::size_t count) {
  auto right = va_free_.find(first + count);
  if (right != va_free_.end()) {
    va_by_size_.erase({right->second, right->first});
    count += right->second;
    va_free_.erase(right);
  }
  auto left = va_free_.lower_bound(first);
  if (left != va_free_.begin()) {
    --left;
    if (left->first + left->second == first) {
      va_by_size_.erase({left->second, left->first});
      first = left->first;
      count += left->second;
      va_free_.erase(left);
    }
  }
  va_free_[first] = count;
  va_by_size_.insert({count, first});
}

void DeviceAllocator::note_mapped(std::ptrdiff_t delta) {
  mapped_ = static_cast<std::size_t>(static_cast<std::ptrdiff_t>(mapped_) + delta);
  peak_mapped_ = std::max(peak_mapped_, mapped_);
}

// ---- segments -------------------------------------------------------------------------------

Status DeviceAllocator::grow(bool small, TagId tag, std::size_t bsize, Block** out) {
  const std::size_t count = small ? 1 : bsize / gran_;
  const std::size_t bytes = count * gran_;
  if (limit_ && mapped_ + bytes > *limit_) {
    return OutOfMemory("mapping " + std::to_string(bytes) + " more bytes would pass the allocator limit of " +
                       std::to_string(*limit_) + " bytes (" + std::to_string(mapped_) + " mapped: " +
                       std::to_string(allocated_ - paused_live_) + " in live blocks, " +
                       std::to_string(mapped_ - (allocated_ - paused_live_)) + " cached)");
  }
  const std::size_t first = va_alloc(count);
  if (first == kNone) {
    return OutOfMemory("no free address range of " + std::to_string(count) + " granules left in the " +
                       std::to_string(arena_->capacity()) + "-byte reservation");
  }
  Status st = arena_->map(first * gran_, bytes);
  if (!st.ok()) {
    va_free(first, count);
    return st;
  }
  Segment* s = new Segment();
  s->first = first;
  s->count = count;
  s->tag = tag;
  s->small = small;
  Block* b = new Block();
  b->addr = arena_->base() + first * gran_;
  b->size = bytes;
  b->seg = s;
  s->head = b;
  segments_[first] = s;
  note_mapped(static_cast<std::ptrdiff_t>(bytes));
  maps_ += count;
  index_insert(b);
  *out = b;
  return Status::Ok();
}

bool DeviceAllocator::segment_free(const Segment* s) const {
  if (s->live != 0) return false;
  for (const Block* b = s->head; b != nullptr; b = b->next) {
    if (b->fence) return false;
  }
  return true;
}

// Unmaps a segment whose blocks are all free and reusable by any stream.
Status DeviceAllocator::release_segment(Segment* s) {
  const std::size_t bytes = s->count * gran_;
  if (!s->paused) EKV_RETURN_IF_ERROR(arena_->unmap(s->first * gran_, bytes, nullptr));
  for (Block* b = s->head; b != nullptr;) {
    Block* n = b->next;
    index_erase(b);
    delete b;
    b = n;
  }
  segments_.erase(s->first);
  va_free(s->first, s->count);
  if (s->paused) {
    paused_ -= bytes;
  } else {
    note_mapped(-static_cast<std::ptrdiff_t>(bytes));
    unmaps_ += s->count;
  }
  delete s;
  return Status::Ok();
}

// Makes free block b of a large segment a segment of its own (large blocks are whole granules),
// so that it can be unmapped while its neighbours stay.
DeviceAllocator::Segment* DeviceAllocator::carve(Segment* s, Block* b) {
  const std::size_t bfirst = (b->addr - arena_->base()) / gran_;
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
    segments_[r->first] = r;
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
  segments_[bfirst] = m;
  return m;
}

// Unmaps every mapped segment that holds no live block and no block the device may still use;
// with `carve`, also the free whole granules inside large segments. Returns bytes unmapped.
std::size_t DeviceAllocator::release_free_segments(bool carve_large) {
  std::vector<Segment*> victims;
  std::vector<Block*> carved;
  for (auto& kv : segments_) {
    Segment* s = kv.second;
    if (s->paused) continue;
    if (segment_free(s)) {
      victims.push_back(s);
    } else if (carve_large && !s->small) {
      for (Block* b = s->head; b != nullptr; b = b->next) {
        if (!b->allocated && !b->fence) carved.push_back(b);
      }
    }
  }
  for (Block* b : carved) victims.push_back(carve(b->seg, b));
  std::size_t bytes = 0;
  for (Segment* s : victims) {
    const std::size_t n = s->count * gran_;
    if (release_segment(s).ok()) bytes += n;  // a failed unmap keeps the segment cached
  }
  return bytes;
}

Status DeviceAllocator::wait_fence(FenceRef* f) {
  if (f->done) return Status::Ok();
  Status st = f->fence != nullptr ? fences_->fence_wait(f->fence) : fences_->synchronize();
  if (st.ok()) f->done = true;
  return st;
}

// Event leaks happen where nobody can be told (a block reused, a pending unmap reaped inside an
// unrelated call), so they are counted by the backends and turned into last_error here, once,
// at the end of each call that may have destroyed events.
void DeviceAllocator::report_leaks() {
  if (!fences_) return;
  const std::uint64_t own = fences_->leaked_fences(), in_arena = arena_->leaked_fences();
  if (own == leaks_seen_own_ && in_arena == leaks_seen_arena_) return;
  const std::uint64_t fresh = (own - leaks_seen_own_) + (in_arena - leaks_seen_arena_);
  const std::string why = own != leaks_seen_own_ ? fences_->last_leak() : arena_->last_fence_leak();
  leaks_seen_own_ = own;
  leaks_seen_arena_ = in_arena;
  Allocator::instance().record_error("allocator on " + where() + ": " + std::to_string(fresh) +
                                     " CUDA event(s) could not be destroyed (" + std::to_string(own + in_arena) +
                                     " leaked in all, stats()['leaked_events']): " + why);
}

Status DeviceAllocator::wait_streams(const std::vector<void*>& streams) {
  for (void* stream : streams) {
    Fence f = nullptr;
    EKV_RETURN_IF_ERROR(fences_->record_fence(stream, &f));
    Status st = fences_->fence_wait(f);
    fences_->destroy_fence(f);
    EKV_RETURN_IF_ERROR(st);
  }
  return Status::Ok();
}

// ---- public calls ---------------------------------------------------------------------------

Status DeviceAllocator::malloc(std::size_t size, void* stream, TagId tag, void** out) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  *out = nullptr;
  // Built only on failure: the success path stays free of string work.
  auto call = [&] {
    return "ekv_malloc(size=" + std::to_string(size) + ", device=" + where() + ", stream=" +
           hex(reinterpret_cast<std::uintptr_t>(stream)) + ")";
  };
  if (closed_) return Unavailable(call() + ": this device's allocator was closed");
  if (size == 0) {
    failed_mallocs_ += 1;
    return InvalidArgument(call() + ": size 0 allocates nothing; the result is NULL");
  }
  if (size > arena_->capacity()) {
    failed_mallocs_ += 1;
    return OutOfMemory(call() + ": more than the " + std::to_string(arena_->capacity()) +
                       " bytes of address space this device's allocator reserves");
  }
  const bool small = size <= small_limit_;
  const std::size_t bsize = round_up(size, small ? kBlockAlign : gran_);
  // A few event queries per malloc keep the pending list (and live events) short even when a
  // single stream reuses most blocks itself and lookups never fail.
  if (pending_head_ != nullptr) promote_oldest();
  Block* b = find_free(small, tag, stream, bsize);
  if (b == nullptr && pending_head_ != nullptr) {
    promote_done(false);
    b = find_free(small, tag, stream, bsize);
  }
  if (b == nullptr) {
    Status st = grow(small, tag, bsize, &b);
    if (!st.ok() && st.code() == StatusCode::kOutOfMemory) {
      // Give back what other sizes and tags keep cached, then try once more.
      if (pending_head_ != nullptr) promote_done(false);
      if (release_free_segments(true) > 0) st = grow(small, tag, bsize, &b);
    }
    if (!st.ok()) {
      failed_mallocs_ += 1;
      return Status(st.code(), call() + ": " + st.message() + " (NULL returned; live blocks untouched)");
    }
  }
  b = take(b, bsize, size, stream);
  mallocs_ += 1;
  *out = reinterpret_cast<void*>(b->addr);
  return Status::Ok();
}

Status DeviceAllocator::free(void* ptr, std::size_t size, void* stream) {
  if (ptr == nullptr) return Status::Ok();  // like free(NULL)
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(ptr);
  auto call = [&] {
    return "ekv_free(ptr=" + hex(addr) + ", size=" + std::to_string(size) + ", device=" + where() + ")";
  };
  auto it = live_.find(addr);
  if (it == live_.end()) {
    failed_frees_ += 1;
    if (addr >= arena_->base() && addr < arena_->base() + arena_->capacity()) {
      return InvalidArgument(call() + ": no live allocation starts at this address (a double free, or a pointer "
                             "into a block); nothing was freed");
    }
    return InvalidArgument(call() + ": the pointer was not allocated by this allocator on " + where() +
                           "; nothing was freed");
  }
  Block* b = it->second;
  if (size != b->requested) {
    failed_frees_ += 1;
    return InvalidArgument(call() + ": the block at this address was allocated with size " +
                           std::to_string(b->requested) + "; nothing was freed");
  }
  Segment* s = b->seg;
  std::shared_ptr<FenceRef> fence;
  if (fences_ && !s->paused) {
    Fence f = nullptr;
    Status st = fences_->record_fence(stream, &f);
    if (st.ok()) {
      fence = std::make_shared<FenceRef>(fences_.get(), f);
    } else {
      // torch never retries a free, so refusing it would keep the block for good. A wait now
      // tells what the event would have: the stream's work first (the block's last use is
      // there), the whole device if the stream cannot be waited on. Only when neither works
      // does the block wait, with a null fence, for trim()'s synchronize; its own stream may
      // reuse it meanwhile (stream order).
      free_event_failures_ += 1;
      report_leaks();  // a leak on the way (the unrecorded event) first: the free's note is the news
      std::string how;
      Status ss = fences_->synchronize_stream(stream);
      Status cs = ss.ok() ? ss : fences_->synchronize();
      if (ss.ok()) {
        how = "synchronized the stream instead, and freed the block";
      } else if (cs.ok()) {
        how = ss.message() + "; synchronized the device instead, and freed the block";
      } else {
        how = ss.message() + "; " + cs.message() +
              "; the block is freed, reusable by its stream only until trim() synchronizes the device";
        fence = std::make_shared<FenceRef>(fences_.get(), nullptr);
      }
      Allocator::instance().record_error(call() + ": recording the free-time event failed: " + st.message() + "; " +
                                         how);
    }
  }
  live_.erase(it);
  allocated_ -= b->size;
  requested_ -= b->requested;
  s->live -= 1;
  s->live_bytes -= b->size;
  if (s->paused) {
    paused_live_ -= b->size;
    TagState& ts = tags_[s->tag];
    auto bk = ts.backups.find(b);
    if (bk != ts.backups.end()) {
      ts.backup_bytes -= bk->second.size();
      ts.backups.erase(bk);
    }
  }
  b->allocated = false;
  b->requested = 0;
  b->stream = fence ? stream : nullptr;
  b->fence = std::move(fence);
  frees_ += 1;
  b = coalesce(b);
  if (!s->paused) {
    index_insert(b);
    if (b->fence) pending_push(b);
  }
  return Status::Ok();
}

Status DeviceAllocator::trim(std::size_t* released) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  *released = 0;
  const std::size_t held_before = arena_->stats().held_bytes;
  if (pending_head_ != nullptr) promote_done(true);
  release_free_segments(true);
  std::size_t r = 0;
  Status st = arena_->trim(&r, true);
  const std::size_t held_after = arena_->stats().held_bytes;
  *released = held_before > held_after ? held_before - held_after : 0;
  if (!st.ok()) return Status(st.code(), "allocator trim on " + where() + ": " + st.message());
  return Status::Ok();
}

Status DeviceAllocator::set_limit(std::optional<std::size_t> limit) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  limit_ = limit;
  if (limit && mapped_ > *limit) {
    if (pending_head_ != nullptr) promote_done(false);
    release_free_segments(true);
    std::size_t r = 0;
    arena_->trim(&r, false);  // best effort: what the device still uses goes back at the next trim
  }
  return Status::Ok();
}

Status DeviceAllocator::pause(TagId tag, bool backup, std::size_t* released) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  *released = 0;
  const std::string call = "pause(tag='" + Allocator::instance().tag_name(tag) + "', backup=" +
                           (backup ? "True" : "False") + ", device=" + where() + ")";
  TagState& ts = tags_[tag];
  if (ts.paused) return InvalidArgument(call + ": the tag is already paused; nothing changed");
  std::vector<Segment*> segs;
  for (auto& kv : segments_) {
    if (kv.second->tag == tag && !kv.second->paused) segs.push_back(kv.second);
  }
  // The device must be done with every block first: live ones (on their streams) and free ones
  // (their free-time events) — event waits, not a device-wide synchronize.
  if (fences_) {
    std::vector<void*> streams;
    for (Segment* s : segs) {
      for (Block* b = s->head; b != nullptr; b = b->next) {
        if (b->allocated && std::find(streams.begin(), streams.end(), b->stream) == streams.end()) {
          streams.push_back(b->stream);
        }
        if (b->fence && !b->fence->done) {
          Status st = wait_fence(b->fence.get());
          if (!st.ok()) return Status(st.code(), call + ": " + st.message() + "; nothing changed");
        }
      }
    }
    Status st = wait_streams(streams);
    if (!st.ok()) return Status(st.code(), call + ": " + st.message() + "; nothing changed");
    promote_done(false);  // the waited blocks are reusable by any stream now
  }
  std::unordered_map<Block*, std::vector<unsigned char>> saved;
  std::size_t saved_bytes = 0;
  if (backup) {
    for (Segment* s : segs) {
      for (Block* b = s->head; b != nullptr; b = b->next) {
        if (!b->allocated) continue;
        std::vector<unsigned char> buf;
        try {
          buf.resize(b->requested);
        } catch (const std::bad_alloc&) {
          return OutOfMemory(call + ": no host memory for a " + std::to_string(b->requested) +
                             "-byte backup; nothing changed");
        }
        Status st = arena_->copy_to_host(buf.data(), b->addr - arena_->base(), b->requested);
        if (!st.ok()) return Status(st.code(), call + ": " + st.message() + "; nothing changed");
        saved_bytes += buf.size();
        saved.emplace(b, std::move(buf));
      }
    }
  }
  const std::size_t held_before = arena_->stats().held_bytes;
  std::vector<Segment*> to_pause;
  for (Segment* s : segs) {
    if (segment_free(s)) {
      release_segment(s);  // nothing live: give it back outright (a failure keeps it cached)
    } else {
      to_pause.push_back(s);
    }
  }
  for (std::size_t i = 0; i < to_pause.size(); ++i) {
    Segment* s = to_pause[i];
    Status st = arena_->unmap(s->first * gran_, s->count * gran_, nullptr);
    if (!st.ok()) {
      // Put back what this call unmapped; with a backup the bytes come back too.
      std::size_t lost = 0;
      for (std::size_t j = 0; j < i; ++j) {
        Segment* d = to_pause[j];
        if (!arena_->map(d->first * gran_, d->count * gran_).ok()) continue;
        for (Block* b = d->head; b != nullptr; b = b->next) {
          auto bk = saved.find(b);
          if (bk != saved.end()) arena_->copy_from_host(b->addr - arena_->base(), bk->second.data(), bk->second.size());
          else if (b->allocated) ++lost;
        }
      }
      std::string tail = lost ? "; the contents of " + std::to_string(lost) + " blocks were lost" : "; nothing changed";
      return Status(st.code(), call + ": " + st.message() + tail);
    }
  }
  for (Segment* s : to_pause) {
    for (Block* b = s->head; b != nullptr; b = b->next) {
      if (b->allocated) continue;
      index_erase(b);
      if (b->listed) pending_unlink(b);
      b->fence.reset();
      b->stream = nullptr;
    }
    s->paused = true;
    note_mapped(-static_cast<std::ptrdiff_t>(s->count * gran_));
    paused_ += s->count * gran_;
    paused_live_ += s->live_bytes;
    unmaps_ += s->count;
  }
  ts.paused = true;
  ts.backups = std::move(saved);
  ts.backup_bytes = saved_bytes;
  std::size_t r = 0;
  Status st = arena_->trim(&r, true);
  const std::size_t held_after = arena_->stats().held_bytes;
  *released = held_before > held_after ? held_before - held_after : 0;
  if (!st.ok()) return Status(st.code(), call + ": paused, but giving the memory back failed: " + st.message());
  return Status::Ok();
}

Status DeviceAllocator::resume(TagId tag) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  const std::string call = "resume(tag='" + Allocator::instance().tag_name(tag) + "', device=" + where() + ")";
  auto tit = tags_.find(tag);
  if (tit == tags_.end() || !tit->second.paused) return InvalidArgument(call + ": the tag is not paused");
  TagState& ts = tit->second;
  std::vector<Segment*> remap, empty;
  std::size_t need = 0;
  for (auto& kv : segments_) {
    Segment* s = kv.second;
    if (s->tag != tag || !s->paused) continue;
    if (s->live == 0) {
      empty.push_back(s);
    } else {
      remap.push_back(s);
      need += s->count * gran_;
    }
  }
  if (limit_ && mapped_ + need > *limit_) {
    // Like a malloc: first give back what is cached, then check again.
    if (pending_head_ != nullptr) promote_done(false);
    release_free_segments(true);
  }
  if (limit_ && mapped_ + need > *limit_) {
    return OutOfMemory(call + ": mapping the tag's " + std::to_string(need) + " bytes would pass the allocator limit of " +
                       std::to_string(*limit_) + " bytes (" + std::to_string(mapped_) + " mapped); the tag stays paused");
  }
  for (std::size_t i = 0; i < remap.size(); ++i) {
    Status st = arena_->map(remap[i]->first * gran_, remap[i]->count * gran_);
    if (!st.ok()) {
      for (std::size_t j = 0; j < i; ++j) arena_->unmap(remap[j]->first * gran_, remap[j]->count * gran_, nullptr);
      return Status(st.code(), call + ": " + st.message() + "; the tag stays paused");
    }
  }
  for (Segment* s : empty) release_segment(s);  // emptied while paused: nothing to bring back
  Status copy_status;
  std::size_t not_restored = 0;
  for (auto& kv : ts.backups) {
    Status st = arena_->copy_from_host(kv.first->addr - arena_->base(), kv.second.data(), kv.second.size());
    if (!st.ok()) {
      if (copy_status.ok()) copy_status = st;
      ++not_restored;
    }
  }
  for (Segment* s : remap) {
    s->paused = false;
    note_mapped(static_cast<std::ptrdiff_t>(s->count * gran_));
    paused_ -= s->count * gran_;
    paused_live_ -= s->live_bytes;
    maps_ += s->count;
    for (Block* b = s->head; b != nullptr; b = b->next) {
      if (b->allocated) continue;
      b = coalesce(b);
      index_insert(b);
    }
  }
  ts.paused = false;
  ts.backups.clear();
  ts.backup_bytes = 0;
  if (!copy_status.ok()) {
    return Status(copy_status.code(), call + ": resumed, but the contents of " + std::to_string(not_restored) +
                                          " blocks were not restored: " + copy_status.message());
  }
  return Status::Ok();
}

Status DeviceAllocator::close_if_idle() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return Status::Ok();
  std::size_t paused_tags = 0;
  for (const auto& kv : tags_) paused_tags += kv.second.paused ? 1 : 0;
  if (!live_.empty() || paused_tags != 0) {
    return InvalidArgument("close(device=" + where() + "): " + std::to_string(live_.size()) +
                           " allocations are live and " + std::to_string(paused_tags) +
                           " tags paused; free and resume them first (nothing changed)");
  }
  closed_ = true;
  return Status::Ok();
}

Status DeviceAllocator::close_arena() {
  std::lock_guard<std::mutex> lock(mu_);
  // Free-time events are of no more use (the arena's close waits for the device): destroyed
  // now, not whenever an allocator kept aside by a failed close goes away.
  if (pending_head_ != nullptr) promote_done(true);
  Status st = arena_->close();
  report_leaks();
  if (st.ok()) return st;
  return Status(st.code(), "close(device=" + where() + "): the allocator is dropped (the next malloc starts afresh), "
                           "but its memory was not all given back: " + st.message() +
                           " (close(device) again retries)");
}

AllocatorStats DeviceAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  AllocatorStats s;
  s.device = device_;
  s.granularity = gran_;
  s.reserved_bytes = arena_->capacity();
  s.mapped_bytes = mapped_;
  s.allocated_bytes = allocated_;
  s.requested_bytes = requested_;
  s.cached_bytes = mapped_ - (allocated_ - paused_live_);
  s.pending_free_bytes = pending_free_;
  s.paused_bytes = paused_;
  s.peak_allocated_bytes = peak_allocated_;
  s.peak_mapped_bytes = peak_mapped_;
  s.limit_bytes = limit_;
  s.mallocs = mallocs_;
  s.frees = frees_;
  s.failed_mallocs = failed_mallocs_;
  s.failed_frees = failed_frees_;
  s.maps = maps_;
  s.unmaps = unmaps_;
  s.free_event_failures = free_event_failures_;
  s.leaked_events = (fences_ ? fences_->leaked_fences() : 0) + arena_->leaked_fences();
  s.live_blocks = live_.size();
  s.segments = segments_.size();
  std::map<TagId, TagStats> per;
  for (const auto& kv : segments_) {
    TagStats& t = per[kv.second->tag];
    (kv.second->paused ? t.paused_bytes : t.mapped_bytes) += kv.second->count * gran_;
  }
  for (const auto& kv : live_) {
    TagStats& t = per[kv.second->seg->tag];
    t.allocated_bytes += kv.second->size;
    t.requested_bytes += kv.second->requested;
    t.blocks += 1;
  }
  for (const auto& kv : tags_) {
    if (!kv.second.paused && kv.second.backup_bytes == 0 && per.count(kv.first) == 0) continue;
    TagStats& t = per[kv.first];
    t.paused = kv.second.paused;
    t.backup_bytes = kv.second.backup_bytes;
    s.backup_bytes += kv.second.backup_bytes;
  }
  for (auto& kv : per) {
    kv.second.tag = Allocator::instance().tag_name(kv.first);
    s.tags.push_back(kv.second);
  }
  return s;
}

std::vector<BlockInfo> DeviceAllocator::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<BlockInfo> out;
  out.reserve(live_.size());
  for (const auto& kv : live_) {
    const Block* b = kv.second;
    BlockInfo i;
    i.address = b->addr;
    i.size = b->requested;
    i.block_size = b->size;
    i.tag = Allocator::instance().tag_name(b->seg->tag);
    i.stream = reinterpret_cast<std::uintptr_t>(b->stream);
    i.paused = b->seg->paused;
    i.small = b->seg->small;
    out.push_back(std::move(i));
  }
  std::sort(out.begin(), out.end(), [](const BlockInfo& a, const BlockInfo& c) { return a.address < c.address; });
  return out;
}

// ---- the process-wide door ------------------------------------------------------------------

Allocator& Allocator::instance() {
  static Allocator* a = new Allocator();  // never destroyed: see allocator.h
  return *a;
}

Allocator::Allocator() {
  tag_names_.push_back("");
  tag_ids_[""] = 0;
}

Status Allocator::device(int device, std::shared_ptr<DeviceAllocator>* out) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = devices_.find(device);
  if (it == devices_.end()) {
    std::unique_ptr<DeviceAllocator> d;
    EKV_RETURN_IF_ERROR(DeviceAllocator::create(device, reserve_bytes_, &d));
    it = devices_.emplace(device, std::shared_ptr<DeviceAllocator>(std::move(d))).first;
  }
  *out = it->second;
  return Status::Ok();
}

std::vector<std::shared_ptr<DeviceAllocator>> Allocator::devices() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<DeviceAllocator>> out;
  for (auto& kv : devices_) out.push_back(kv.second);
  return out;
}

Status Allocator::close(int device) {
  std::vector<std::shared_ptr<DeviceAllocator>> todo;  // arenas kept aside by earlier closes first
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = devices_.find(device);
    if (it != devices_.end()) EKV_RETURN_IF_ERROR(it->second->close_if_idle());
    auto kept = unclosed_.equal_range(device);
    for (auto k = kept.first; k != kept.second; ++k) todo.push_back(std::move(k->second));
    unclosed_.erase(kept.first, kept.second);
    if (it != devices_.end()) {
      todo.push_back(std::move(it->second));
      devices_.erase(it);
    }
  }
  // Outside the lock: closing waits for the device, and other devices' calls need not wait.
  // Calls still in flight on a dropped allocator finish before close_arena (its lock); its
  // mallocs are refused from close_if_idle on.
  Status first_error;
  std::vector<std::shared_ptr<DeviceAllocator>> failed;
  for (auto& d : todo) {
    Status st = d->close_arena();
    if (st.ok()) continue;
    if (first_error.ok()) first_error = st;
    failed.push_back(std::move(d));
  }
  if (!failed.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& d : failed) unclosed_.emplace(device, std::move(d));
  }
  return first_error;
}

std::vector<int> Allocator::unclosed_devices() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int> out;
  for (auto& kv : unclosed_) {
    if (out.empty() || out.back() != kv.first) out.push_back(kv.first);
  }
  return out;
}

void Allocator::set_reserve_bytes(std::size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  reserve_bytes_ = nbytes;
}

TagId Allocator::tag_id(const std::string& name) {
  std::lock_guard<std::mutex> lock(tags_mu_);
  auto it = tag_ids_.find(name);
  if (it != tag_ids_.end()) return it->second;
  TagId id = static_cast<TagId>(tag_names_.size());
  tag_names_.push_back(name);
  tag_ids_[name] = id;
  return id;
}

bool Allocator::find_tag(const std::string& name, TagId* id) {
  std::lock_guard<std::mutex> lock(tags_mu_);
  auto it = tag_ids_.find(name);
  if (it == tag_ids_.end()) return false;
  *id = it->second;
  return true;
}

std::string Allocator::tag_name(TagId id) {
  std::lock_guard<std::mutex> lock(tags_mu_);
  return id < tag_names_.size() ? tag_names_[id] : std::string("?");
}

TagId Allocator::thread_tag() { return t_thread_tag; }
void Allocator::set_thread_tag(TagId id) { t_thread_tag = id; }

void Allocator::record_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mu_);
  last_error_ = message;
}

std::optional<std::string> Allocator::last_error(bool clear) {
  std::lock_guard<std::mutex> lock(error_mu_);
  std::optional<std::string> e = last_error_;
  if (clear) last_error_.reset();
  return e;
}

void* Allocator::malloc(std::size_t size, int device, void* stream) noexcept {
  try {
    for (int attempt = 0; attempt < 2; ++attempt) {
      std::shared_ptr<DeviceAllocator> d;
      Status st = this->device(device, &d);
      if (!st.ok()) {
        record_error("ekv_malloc(size=" + std::to_string(size) + ", device=" + std::to_string(device) + "): " +
                     st.message());
        return nullptr;
      }
      void* p = nullptr;
      st = d->malloc(size, stream, thread_tag(), &p);
      if (st.code() == StatusCode::kUnavailable && attempt == 0) continue;  // closed meanwhile: a fresh one
      if (!st.ok()) record_error(st.message());
      return p;
    }
  } catch (const std::exception& e) {
    record_error(std::string("ekv_malloc: internal error: ") + e.what());
  } catch (...) {
    record_error("ekv_malloc: internal error");
  }
  return nullptr;
}

void Allocator::free(void* ptr, std::size_t size, int device, void* stream) noexcept {
  try {
    if (ptr == nullptr) return;
    std::shared_ptr<DeviceAllocator> d;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = devices_.find(device);
      if (it != devices_.end()) d = it->second;
    }
    if (d == nullptr) {
      record_error("ekv_free(ptr=" + hex(reinterpret_cast<std::uintptr_t>(ptr)) + ", size=" + std::to_string(size) +
                   ", device=" + std::to_string(device) + "): this allocator has made no allocation on that device; "
                   "nothing was freed");
      return;
    }
    Status st = d->free(ptr, size, stream);
    if (!st.ok()) record_error(st.message());
  } catch (const std::exception& e) {
    record_error(std::string("ekv_free: internal error: ") + e.what());
  } catch (...) {
    record_error("ekv_free: internal error");
  }
}

}  // namespace ekv
