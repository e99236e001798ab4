// device_allocator.cpp — blocks and segments over one arena per device; see device_allocator.h.
#include "alloc/device_allocator.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <utility>

#include "alloc/allocator.h"

namespace ekv {
namespace {

constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();

std::string device_text(int device) { return device < 0 ? std::string("cpu") : "cuda:" + std::to_string(device); }

// Rounds up, or returns kNone when the result would not fit.
std::size_t round_up(std::size_t n, std::size_t a) {
  if (n > kNone - (a - 1)) return kNone;
  return (n + a - 1) / a * a;
}

}  // namespace

std::string hex_text(std::uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
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
      small_limit_(std::min(kSmallLimit, arena_->granularity() / 2)),
      segs_(arena_->base(), arena_->granularity(), arena_->capacity() / arena_->granularity()) {}

// Only reached if creation is undone; the process-wide allocators live until exit. The
// records go before fences_ (members in reverse order): their events are destroyed through it.
DeviceAllocator::~DeviceAllocator() = default;

std::string DeviceAllocator::where() const { return device_text(device_); }

// ---- free blocks: split, merge, and the wait for their free-time events ---------------------

// Turns free block b into an allocation of bsize bytes; the rest stays free, in the same state.
Block* DeviceAllocator::take(Block* b, std::size_t bsize, std::size_t requested, void* stream) {
  index_.erase(b);
  unlist(b);
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
    r->bound = b->bound;
    r->fence = b->fence;
    b->size = bsize;
    enlist(r);
    index_.insert(r);
  }
  b->fence.reset();
  b->bound = false;
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

// Merges free block b (in neither the index nor a list) with free neighbours in the same
// state: both reusable by any stream, or b freed just now (no event yet) and the neighbour
// freed on the same stream: the merged block waits for an event recorded later than either
// free (events on one stream complete in order).
Block* DeviceAllocator::coalesce(Block* b) {
  auto compatible = [b](const Block* o) {
    if (o == nullptr || o->allocated) return false;
    if (!b->bound) return !o->bound;
    return o->bound && !b->fence && o->stream == b->stream;
  };
  while (compatible(b->next)) {
    Block* n = b->next;
    index_.erase(n);
    unlist(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next != nullptr) n->next->prev = b;
    delete n;
  }
  while (compatible(b->prev)) {
    Block* p = b->prev;
    index_.erase(p);
    unlist(p);
    p->size += b->size;
    p->next = b->next;
    if (b->next != nullptr) b->next->prev = p;
    p->fence = std::move(b->fence);
    p->stream = b->stream;
    p->bound = b->bound;
    delete b;
    b = p;
  }
  return b;
}

// Free blocks whose free-time event has completed become reusable by any stream (waiting for
// the events first if `wait`: an event wait, never a device-wide synchronize).
void DeviceAllocator::promote_done(bool wait) {
  bool synced = false;  // a device synchronize (for a block without an event) finished everything
  const std::uint64_t pass = ++pass_;
  for (Block* b = pending_.head(); b != nullptr;) {
    Block* next = b->pnext;
    FenceRef* f = b->fence.get();
    if (!f->done) {
      if (synced) {
        f->done = true;
      } else if (wait) {
        f->done = wait_fence(*fences_, f).ok();
        synced = f->done && f->fence == nullptr;
      } else if (f->fence != nullptr && f->asked != pass) {
        f->asked = pass;  // blocks sharing the event: one query answers for all of them
        poll_fence(*fences_, f);
      }
    }
    if (f->done) {
      index_.erase(b);
      pending_.unlink(b);
      b->fence.reset();
      b->bound = false;
      b->stream = nullptr;
      b = coalesce(b);  // only with ready neighbours, which are not on the pending list
      index_.insert(b);
    }
    b = next;
  }
}

// Promotes the oldest pending blocks whose events have completed, asking the driver at most
// once per malloc: the blocks a handoff moved here share one event per stream, so one query
// promotes them all, and the list drains faster than handoffs fill it. Blocks without an
// event (they wait for a synchronize) are stepped over, a few at most, so that they do not
// stall the draining behind them.
void DeviceAllocator::promote_oldest() {
  int skipped = 0;
  bool asked = false;
  for (Block* b = pending_.head(); b != nullptr;) {
    Block* next = b->pnext;
    FenceRef* f = b->fence.get();
    if (!f->done && f->fence == nullptr) {
      if (++skipped > 4) return;
      b = next;
      continue;
    }
    if (!f->done) {
      if (asked) return;
      asked = true;
      if (!poll_fence(*fences_, f)) return;
    }
    index_.erase(b);
    pending_.unlink(b);
    b->fence.reset();
    b->bound = false;
    b->stream = nullptr;
    index_.insert(coalesce(b));  // merges only with ready neighbours: `next` is still pending
    b = next;
  }
}

void DeviceAllocator::unlist(Block* b) {
  if (!b->listed) return;
  (b->fence ? pending_ : unfenced_).unlink(b);
}

void DeviceAllocator::enlist(Block* b) {
  if (b->bound) (b->fence ? pending_ : unfenced_).push(b);
}

void DeviceAllocator::fence_unfenced() {
  if (unfenced_.empty()) return;
  std::vector<std::pair<void*, std::shared_ptr<FenceRef>>> made;  // per stream, this handoff
  for (Block* b = unfenced_.head(); b != nullptr;) {
    Block* next = b->pnext;
    unfenced_.unlink(b);
    std::shared_ptr<FenceRef>* fence = nullptr;
    for (auto& m : made) {
      if (m.first == b->stream) fence = &m.second;
    }
    if (fence == nullptr) {
      FreeEvent ev = record_free_event(*fences_, b->stream);
      if (ev.error.ok()) {
        events_recorded_ += 1;
      } else {
        free_event_failures_ += 1;
        report_leaks();  // a leak on the way (the unrecorded event) first: this note is the news
        Allocator::instance().record_error(
            "allocator on " + where() + ": recording the event for blocks freed on stream " +
            hex_text(reinterpret_cast<std::uintptr_t>(b->stream)) + " failed: " + ev.error.message() + "; " + ev.how);
      }
      made.emplace_back(b->stream, std::move(ev.fence));
      fence = &made.back().second;
    }
    if (*fence) {
      b->fence = *fence;
      pending_.push(b);
    } else {
      // The wait instead of an event finished the stream's work: reusable by any stream now.
      index_.erase(b);
      b->bound = false;
      b->stream = nullptr;
      index_.insert(b);
    }
    b = next;
  }
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
                       std::to_string(*limit_) + " bytes (" + std::to_string(mapped_) +
                       " mapped: " + std::to_string(allocated_ - paused_live_) + " in live blocks, " +
                       std::to_string(mapped_ - (allocated_ - paused_live_)) + " cached)");
  }
  const std::size_t first = segs_.take_range(count);
  if (first == Segments::kNoRange) {
    return OutOfMemory("no free address range of " + std::to_string(count) + " granules left in the " +
                       std::to_string(arena_->capacity()) + "-byte reservation");
  }
  Status st = arena_->map(first * gran_, bytes);
  if (!st.ok()) {
    segs_.give_range(first, count);
    return st;
  }
  Block* b = segs_.add(first, count, tag, small)->head;
  note_mapped(static_cast<std::ptrdiff_t>(bytes));
  maps_ += count;
  index_.insert(b);
  *out = b;
  return Status::Ok();
}

// Unmaps a segment whose blocks are all free and reusable by any stream.
Status DeviceAllocator::release_segment(Segment* s) {
  const std::size_t bytes = s->count * gran_;
  const std::size_t count = s->count;
  const bool paused = s->paused;
  if (!paused) EKV_RETURN_IF_ERROR(arena_->unmap(s->first * gran_, bytes, nullptr));
  for (Block* b = s->head; b != nullptr; b = b->next) index_.erase(b);
  segs_.remove(s);
  if (paused) {
    paused_ -= bytes;
  } else {
    note_mapped(-static_cast<std::ptrdiff_t>(bytes));
    unmaps_ += count;
  }
  return Status::Ok();
}

// Unmaps every mapped segment that holds no live block and no block the device may still use;
// with `carve`, also the free whole granules inside large segments. Returns bytes unmapped.
std::size_t DeviceAllocator::release_free_segments(bool carve_large) {
  std::vector<Segment*> victims;
  std::vector<Block*> carved;
  for (auto& kv : segs_) {
    Segment* s = kv.second;
    if (s->paused) continue;
    if (Segments::all_free(s)) {
      victims.push_back(s);
    } else if (carve_large && !s->small) {
      for (Block* b = s->head; b != nullptr; b = b->next) {
        if (!b->allocated && !b->bound) carved.push_back(b);
      }
    }
  }
  for (Block* b : carved) victims.push_back(segs_.carve(b->seg, b));
  std::size_t bytes = 0;
  for (Segment* s : victims) {
    const std::size_t n = s->count * gran_;
    if (release_segment(s).ok()) bytes += n;  // a failed unmap keeps the segment cached
  }
  return bytes;
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

// ---- public calls ---------------------------------------------------------------------------

Status DeviceAllocator::malloc(std::size_t size, void* stream, TagId tag, void** out) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  *out = nullptr;
  // Built only on failure: the success path stays free of string work.
  auto call = [&] {
    return "ekv_malloc(size=" + std::to_string(size) + ", device=" + where() +
           ", stream=" + hex_text(reinterpret_cast<std::uintptr_t>(stream)) + ")";
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
  if (!pending_.empty()) promote_oldest();
  Block* b = index_.find(small, tag, stream, bsize);
  if (b == nullptr && !(pending_.empty() && unfenced_.empty())) {
    // Blocks freed on other streams: the handoff records their events (one per stream).
    fence_unfenced();
    promote_done(false);
    b = index_.find(small, tag, stream, bsize);
  }
  if (b == nullptr) {
    Status st = grow(small, tag, bsize, &b);
    if (!st.ok() && st.code() == StatusCode::kOutOfMemory) {
      // Give back what other sizes, tags and streams keep cached, then try once more. Like
      // torch's caching allocator on OOM, wait for the freed blocks' events first (event waits,
      // not a device synchronize): a NULL is worse than a wait, and under install() torch does
      // not even check it.
      fence_unfenced();
      if (!pending_.empty()) promote_done(true);
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
    return "ekv_free(ptr=" + hex_text(addr) + ", size=" + std::to_string(size) + ", device=" + where() + ")";
  };
  auto it = live_.find(addr);
  if (it == live_.end()) {
    failed_frees_ += 1;
    if (addr >= arena_->base() && addr < arena_->base() + arena_->capacity()) {
      return InvalidArgument(call() +
                             ": no live allocation starts at this address (a double free, or a pointer "
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
  // No event now: the freeing stream may reuse the block at once (stream order), and an event
  // is recorded only when the block must go elsewhere (fence_unfenced). The host's memory is
  // touched synchronously, and a paused block's memory is not mapped.
  b->bound = fences_ != nullptr && !s->paused;
  b->stream = b->bound ? stream : nullptr;
  b->fence.reset();
  frees_ += 1;
  b = coalesce(b);
  if (!s->paused) {
    index_.insert(b);
    enlist(b);
  }
  return Status::Ok();
}

Status DeviceAllocator::trim(std::size_t* released) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  *released = 0;
  const std::size_t held_before = arena_->stats().held_bytes;
  fence_unfenced();
  if (!pending_.empty()) promote_done(true);
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
    fence_unfenced();
    if (!pending_.empty()) promote_done(false);
    release_free_segments(true);
    std::size_t r = 0;
    // Best effort: the limit is set either way, and what the device still uses (or the driver
    // refused) goes back at the next trim.
    arena_->trim(&r, false).IgnoreError();
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
  fence_unfenced();
  if (!pending_.empty()) promote_done(true);
  Status st = arena_->close();
  report_leaks();
  if (st.ok()) return st;
  return Status(st.code(), "close(device=" + where() +
                               "): the allocator is dropped (the next malloc starts afresh), "
                               "but its memory was not all given back: " +
                               st.message() + " (close(device) again retries)");
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
  s.pending_free_bytes = pending_.bytes() + unfenced_.bytes();
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
  s.events_recorded = events_recorded_;
  s.leaked_events = (fences_ ? fences_->leaked_fences() : 0) + arena_->leaked_fences();
  s.live_blocks = live_.size();
  s.segments = segs_.size();
  std::map<TagId, TagStats> per;
  for (const auto& kv : segs_) {
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

}  // namespace ekv
