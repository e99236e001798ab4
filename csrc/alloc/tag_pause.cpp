// tag_pause.cpp — DeviceAllocator::pause and resume (see tag_pause.h): a tag's segments
// unmapped with their addresses kept, and mapped again.
#include "alloc/tag_pause.h"

#include <algorithm>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "alloc/allocator.h"
#include "alloc/device_allocator.h"

namespace ekv {

Status DeviceAllocator::pause(TagId tag, bool backup, std::size_t* released) {
  std::lock_guard<std::mutex> lock(mu_);
  LeakReport report{this};
  *released = 0;
  const std::string call = "pause(tag='" + Allocator::instance().tag_name(tag) +
                           "', backup=" + (backup ? "True" : "False") + ", device=" + where() + ")";
  TagState& ts = tags_[tag];
  if (ts.paused) return InvalidArgument(call + ": the tag is already paused; nothing changed");
  std::vector<Segment*> segs;
  for (auto& kv : segs_) {
    if (kv.second->tag == tag && !kv.second->paused) segs.push_back(kv.second);
  }
  // The device must be done with every block first: live ones (on their streams) and free ones
  // (their free-time events) — event waits, not a device-wide synchronize.
  if (fences_) {
    std::vector<void*> streams;
    for (Segment* s : segs) {
      for (Block* b = s->head; b != nullptr; b = b->next) {
        // Live blocks, and free ones with no event yet: the work on their streams.
        const bool on_stream = b->allocated || (b->bound && !b->fence);
        if (on_stream && std::find(streams.begin(), streams.end(), b->stream) == streams.end()) {
          streams.push_back(b->stream);
        }
        if (b->fence && !b->fence->done) {
          Status st = wait_fence(*fences_, b->fence.get());
          if (!st.ok()) return Status(st.code(), call + ": " + st.message() + "; nothing changed");
        }
      }
    }
    Status st = wait_streams(*fences_, streams);
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
    if (Segments::all_free(s)) {
      // Nothing live: given back outright. A failed unmap keeps it mapped and cached, which is
      // what a later trim retries; the pause itself does not depend on it.
      release_segment(s).IgnoreError();
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
          if (bk != saved.end()) {
            if (!arena_->copy_from_host(b->addr - arena_->base(), bk->second.data(), bk->second.size()).ok()) ++lost;
          } else if (b->allocated) {
            ++lost;
          }
        }
      }
      std::string tail = lost ? "; the contents of " + std::to_string(lost) + " blocks were lost" : "; nothing changed";
      return Status(st.code(), call + ": " + st.message() + tail);
    }
  }
  for (Segment* s : to_pause) {
    for (Block* b = s->head; b != nullptr; b = b->next) {
      if (b->allocated) continue;
      index_.erase(b);
      unlist(b);
      b->fence.reset();
      b->bound = false;
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
  for (auto& kv : segs_) {
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
    if (!pending_.empty()) promote_done(false);
    release_free_segments(true);
  }
  if (limit_ && mapped_ + need > *limit_) {
    return OutOfMemory(call + ": mapping the tag's " + std::to_string(need) +
                       " bytes would pass the allocator limit of " + std::to_string(*limit_) + " bytes (" +
                       std::to_string(mapped_) + " mapped); the tag stays paused");
  }
  for (std::size_t i = 0; i < remap.size(); ++i) {
    Status st = arena_->map(remap[i]->first * gran_, remap[i]->count * gran_);
    if (!st.ok()) {
      // Undo, best effort: the map failure is what the caller hears, and a segment that would
      // not unmap again stays mapped in the arena, counted there.
      for (std::size_t j = 0; j < i; ++j) {
        arena_->unmap(remap[j]->first * gran_, remap[j]->count * gran_, nullptr).IgnoreError();
      }
      return Status(st.code(), call + ": " + st.message() + "; the tag stays paused");
    }
  }
  // Emptied while paused: nothing to bring back. A paused segment is not mapped, so giving it
  // back makes no driver call and cannot fail.
  for (Segment* s : empty) release_segment(s).IgnoreError();
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
      index_.insert(b);
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

}  // namespace ekv
