// arena.cpp — granule bookkeeping over a backend: map/unmap/reuse/deferred release.
#include "core/arena.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <new>
#include <string>
#include <utility>

namespace ekv {
namespace {

std::string call_text(const char* call, std::size_t offset, std::size_t nbytes) {
  return std::string("Arena.") + call + "(offset=" + std::to_string(offset) + ", nbytes=" + std::to_string(nbytes) +
         ")";
}

std::string device_name(DeviceKind kind, int index) {
  return kind == DeviceKind::kHost ? std::string("cpu") : "cuda:" + std::to_string(index);
}

}  // namespace

Status Arena::create(const ArenaConfig& config, std::unique_ptr<Arena>* out) {
  if (config.capacity_bytes == 0) return InvalidArgument("Arena(capacity_bytes=0): capacity must be positive");
  if (config.device_index < 0) {
    return InvalidArgument("Arena: device index " + std::to_string(config.device_index) + " is negative");
  }
  // Keep offsets representable as signed 64-bit numbers for the Python side.
  constexpr std::size_t kMaxCapacity = std::size_t(1) << 52;
  if (config.capacity_bytes > kMaxCapacity) {
    return InvalidArgument("Arena(capacity_bytes=" + std::to_string(config.capacity_bytes) + "): more than the " +
                           std::to_string(kMaxCapacity) + " bytes one arena can reserve");
  }
  std::unique_ptr<Backend> backend;
  if (config.kind == DeviceKind::kHost) {
    EKV_RETURN_IF_ERROR(make_host_backend(config.capacity_bytes, &backend));
  } else {
    EKV_RETURN_IF_ERROR(make_cuda_backend(config.device_index, &backend));
  }
  const std::size_t g = backend->caps().granularity;
  const std::size_t capacity = (config.capacity_bytes + g - 1) / g * g;
  std::size_t reuse = config.reuse_bytes < 0 ? kDefaultReuseBytes : static_cast<std::size_t>(config.reuse_bytes);
  reuse = std::min(reuse, capacity);
  std::uintptr_t base = 0;
  Status st = backend->reserve(capacity, &base);
  if (!st.ok()) {
    return Status(st.code(), "Arena(capacity_bytes=" + std::to_string(config.capacity_bytes) + ", device='" +
                                 device_name(config.kind, config.device_index) + "'): " + st.message());
  }
  // The granule table costs host memory in proportion to the capacity (24 bytes per granule):
  // for an absurd capacity it must come back as an error with the range given back, not as an
  // exception that leaks the reservation.
  std::vector<Granule> table;
  try {
    table.resize(capacity / g);
  } catch (const std::bad_alloc&) {
    // The missing table is the error to report; a range the backend will not free is lost
    // address space, not memory.
    backend->free_range(base, capacity).IgnoreError();
    return OutOfMemory("Arena(capacity_bytes=" + std::to_string(config.capacity_bytes) + ", device='" +
                       device_name(config.kind, config.device_index) + "'): no host memory for the table of " +
                       std::to_string(capacity / g) + " granules");
  }
  auto budget = Budget::for_device(config.kind, config.device_index);
  out->reset(new Arena(config, std::move(backend), std::move(budget), base, capacity, reuse, std::move(table)));
  (*out)->budget_->register_arena(out->get(), capacity);
  return Status::Ok();
}

Arena::Arena(const ArenaConfig& config, std::unique_ptr<Backend> backend, std::shared_ptr<Budget> budget,
             std::uintptr_t base, std::size_t capacity, std::size_t reuse_bytes, std::vector<Granule> granules)
    : kind_(config.kind),
      device_index_(config.device_index),
      backend_(std::move(backend)),
      budget_(std::move(budget)),
      base_(base),
      capacity_(capacity),
      granularity_(backend_->caps().granularity),
      reuse_bytes_(reuse_bytes),
      granules_(std::move(granules)) {
  s_.granularity = granularity_;
  s_.reserved_bytes = capacity_;
  s_.reuse_bytes = reuse_bytes_;
}

// A destructor has nobody to tell: what close() cannot give back stays held by the backend.
Arena::~Arena() { close().IgnoreError(); }

bool Arena::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

bool Arena::in_forked_child() const { return getpid() != owner_pid_; }

Status Arena::check_open(const char* call) const {
  if (closed_) return Unavailable(std::string("Arena.") + call + ": the arena is closed");
  if (in_forked_child()) {
    return Unavailable(std::string("Arena.") + call + ": this arena belongs to process " + std::to_string(owner_pid_) +
                       "; a forked child (process " + std::to_string(getpid()) +
                       ") cannot use it, since its memory is the parent's: create a new arena in the child");
  }
  return Status::Ok();
}

Status Arena::check_range(const char* call, std::size_t offset, std::size_t nbytes) const {
  EKV_RETURN_IF_ERROR(check_open(call));
  const std::string what = call_text(call, offset, nbytes);
  if (nbytes == 0) return InvalidArgument(what + ": nbytes must be positive");
  if (offset % granularity_ != 0 || nbytes % granularity_ != 0) {
    return InvalidArgument(what + ": offset and nbytes must be multiples of the granularity (" +
                           std::to_string(granularity_) + " bytes)");
  }
  if (offset > capacity_ || nbytes > capacity_ - offset) {
    return InvalidArgument(what + ": range ends past the arena's capacity (" + std::to_string(capacity_) + " bytes)");
  }
  return Status::Ok();
}

Status Arena::map(std::size_t offset, std::size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  std::size_t newly = 0;
  return map_locked("map", offset, nbytes, false, &newly);
}

Status Arena::ensure_mapped(std::size_t offset, std::size_t nbytes, std::size_t* newly_mapped) {
  std::lock_guard<std::mutex> lock(mu_);
  *newly_mapped = 0;
  return map_locked("ensure_mapped", offset, nbytes, true, newly_mapped);
}

Status Arena::map_locked(const char* call, std::size_t offset, std::size_t nbytes, bool allow_mapped,
                         std::size_t* newly_mapped) {
  EKV_RETURN_IF_ERROR(check_range(call, offset, nbytes));
  const std::size_t first = offset / granularity_;
  const std::size_t span = nbytes / granularity_;
  std::size_t need = 0;
  std::size_t revive = 0;
  std::size_t already = 0;
  for (std::size_t i = first; i < first + span; ++i) {
    if (granules_[i].state == State::kMapped) {
      if (!allow_mapped) {
        return InvalidArgument(call_text(call, offset, nbytes) + ": the granule at offset " +
                               std::to_string(i * granularity_) + " is already mapped");
      }
      ++already;
    } else if (granules_[i].state == State::kPending) {
      ++revive;
    } else {
      ++need;
    }
  }
  const std::size_t count = span - already;  // granules this call maps
  if (count == 0) return Status::Ok();
  if (need > cache_.size() && !pending_.empty()) {
    // Finished unmaps can serve this map from the cache instead of creating (and their bytes
    // leave the budget). A reap failure only leaves granules pending: not this call's error.
    reap_locked(false).IgnoreError();
    revive = 0;
    need = 0;
    for (std::size_t i = first; i < first + span; ++i) {
      if (granules_[i].state == State::kPending)
        ++revive;
      else if (granules_[i].state == State::kUnmapped)
        ++need;
    }
  }
  const std::size_t from_cache = std::min(need, cache_.size());
  const std::size_t new_bytes = (need - from_cache) * granularity_;
  if (new_bytes > 0) {
    Status can = backend_->check_commit(new_bytes);
    if (!can.ok())
      return Status(can.code(), call_text(call, offset, nbytes) + ": " + can.message() + " (nothing was mapped)");
    EKV_RETURN_IF_ERROR(charge_locked(new_bytes, call_text(call, offset, nbytes)));
  }

  // Handles first (cached ones, then created), then one backend map_range per run of
  // consecutive unmapped granules, so a device pays one access call per run rather than one
  // per granule. What a failure leaves is undone: runs mapped so far are unmapped, created
  // handles released; cached handles were only read and stay cached.
  std::vector<std::size_t> targets;  // the unmapped granules, ascending
  targets.reserve(need);
  for (std::size_t i = first; i < first + span; ++i) {
    if (granules_[i].state == State::kUnmapped) targets.push_back(i);
  }
  std::vector<PhysHandle> handles(targets.size());
  for (std::size_t k = 0; k < from_cache; ++k) handles[k] = cache_[cache_.size() - 1 - k];
  std::size_t created = 0;  // handles[from_cache, from_cache + created) came from create
  std::size_t mapped = 0;   // targets[0, mapped) are mapped
  Status failure;
  for (std::size_t k = from_cache; k < targets.size(); ++k) {
    failure = backend_->create(granularity_, &handles[k]);
    if (!failure.ok()) break;
    ++created;
  }
  while (failure.ok() && mapped < targets.size()) {
    std::size_t run = 1;
    while (mapped + run < targets.size() && targets[mapped + run] == targets[mapped] + run) ++run;
    failure = backend_->map_range(addr_of(targets[mapped]), &handles[mapped], run);
    if (failure.ok()) mapped += run;
  }

  if (!failure.ok()) {
    // Best effort, like every undo: the failure that started it is the one reported.
    for (std::size_t k = mapped; k > 0; --k) backend_->unmap(addr_of(targets[k - 1]), granularity_).IgnoreError();
    for (std::size_t k = 0; k < created; ++k) backend_->release(handles[from_cache + k], granularity_).IgnoreError();
    if (new_bytes > 0) budget_->uncharge(new_bytes);
    s_.creates += created;  // they happened, and were released again
    s_.releases += created;
    return Status(failure.code(), call_text(call, offset, nbytes) + ": " + failure.message() + " (nothing was mapped)");
  }
  const std::size_t cache_taken = from_cache;

  // Commit.
  cache_.resize(cache_.size() - cache_taken);
  for (std::size_t k = 0; k < targets.size(); ++k) {
    granules_[targets[k]].state = State::kMapped;
    granules_[targets[k]].handle = handles[k];
  }
  for (std::size_t i = first; i < first + span; ++i) {
    if (granules_[i].state == State::kPending) granules_[i].state = State::kMapped;
  }
  const std::size_t g = granularity_;
  s_.mapped_bytes += count * g;
  s_.pending_bytes -= revive * g;
  s_.cached_bytes -= cache_taken * g;
  s_.held_bytes += created * g;
  s_.maps += count;
  s_.creates += created;
  s_.reuses += cache_taken;
  s_.revives += revive;
  BudgetDelta d;
  d.mapped = static_cast<std::int64_t>(count * g);
  d.pending = -static_cast<std::int64_t>(revive * g);
  d.cached = -static_cast<std::int64_t>(cache_taken * g);
  budget_->apply(d);
  *newly_mapped = count * g;
  return Status::Ok();
}

Status Arena::charge_locked(std::size_t nbytes, const std::string& what) {
  Status st = budget_->try_charge(nbytes, what);
  if (st.ok() || st.code() != StatusCode::kOutOfMemory) return st;
  // Other arenas' reuse caches count against the budget: release some of them and retry.
  // Only when the device's caches could cover the whole shortfall, so a map that fails anyway
  // does not cost other arenas their caches.
  const std::size_t missing = budget_->shortfall(nbytes);
  if (missing == 0 || missing > budget_->stats().cached_bytes) return st;
  if (budget_->reclaim_cached(this, missing) == 0) return st;
  return budget_->try_charge(nbytes, what);
}

std::size_t Arena::try_release_cached(std::size_t nbytes) {
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock() || closed_ || nbytes == 0 || in_forked_child()) return 0;
  const std::size_t keep = s_.cached_bytes > nbytes ? s_.cached_bytes - nbytes : 0;
  std::size_t released = 0;
  // A failed release keeps its handle cached; the caller only wants the bytes that came back.
  release_cache_locked(keep, &released).IgnoreError();
  return released;
}

Status Arena::unmap(std::size_t offset, std::size_t nbytes, void* stream) {
  return unmap(offset, nbytes, std::vector<void*>{stream});
}

Status Arena::add_stream(void* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_open("add_stream"));
  if (std::find(streams_.begin(), streams_.end(), stream) != streams_.end()) return Status::Ok();
  if (streams_.size() >= kMaxStreams) {
    return InvalidArgument("Arena.add_stream: " + std::to_string(kMaxStreams) +
                           " streams are registered already (each costs an event per unmap)");
  }
  streams_.push_back(stream);
  return Status::Ok();
}

Status Arena::remove_stream(void* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_open("remove_stream"));
  auto it = std::find(streams_.begin(), streams_.end(), stream);
  if (it == streams_.end()) return InvalidArgument("Arena.remove_stream: the stream is not registered");
  streams_.erase(it);
  return Status::Ok();
}

std::vector<void*> Arena::streams() const {
  std::lock_guard<std::mutex> lock(mu_);
  return streams_;
}

Status Arena::unmap(std::size_t offset, std::size_t nbytes, const std::vector<void*>& streams) {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_range("unmap", offset, nbytes));
  const std::size_t first = offset / granularity_;
  const std::size_t count = nbytes / granularity_;
  for (std::size_t i = first; i < first + count; ++i) {
    if (granules_[i].state != State::kMapped) {
      return InvalidArgument(call_text("unmap", offset, nbytes) + ": the granule at offset " +
                             std::to_string(i * granularity_) + " is not mapped");
    }
  }
  // Finishing earlier unmaps (driver unmap, release) is kept off this call's path; only a
  // long backlog of events is worked down here, so it cannot grow without bound. After the
  // checks above: a refused call must not move anything.
  // A reap failure leaves those granules pending: not this unmap's error.
  if (pending_.size() >= kMaxPendingBatches) reap_locked(false).IgnoreError();
  const std::size_t g = granularity_;
  if (backend_->caps().deferred_unmap) {
    // One event on every stream that may still use the granules: the caller's and the
    // registered ones. All or nothing: a failed record destroys the events already recorded.
    std::vector<void*> on = streams;
    for (void* s : streams_) {
      if (std::find(on.begin(), on.end(), s) == on.end()) on.push_back(s);
    }
    std::vector<Fence> fences;
    fences.reserve(on.size());
    for (std::size_t k = 0; k < on.size(); ++k) {
      if (std::find(on.begin(), on.begin() + k, on[k]) != on.begin() + k) continue;  // listed twice
      Fence fence = nullptr;
      Status st = backend_->record_fence(on[k], &fence);
      if (!st.ok()) {
        for (Fence f : fences) backend_->destroy_fence(f);
        return Status(st.code(), call_text("unmap", offset, nbytes) + ": " + st.message());
      }
      fences.push_back(fence);
    }
    PendingBatch batch{next_batch_++, std::move(fences), {}};
    batch.granules.reserve(count);
    for (std::size_t i = first; i < first + count; ++i) {
      granules_[i].state = State::kPending;
      granules_[i].batch = batch.serial;
      batch.granules.push_back(i);
    }
    pending_.push_back(std::move(batch));
    s_.pending_bytes += count * g;
  } else {
    for (std::size_t i = first; i < first + count; ++i) {
      Status st = backend_->unmap(addr_of(i), g);
      if (!st.ok()) {
        // Put back what this call already unmapped so the range is as it was.
        // Best effort: the unmap failure is the error to report.
        for (std::size_t j = first; j < i; ++j) backend_->map(addr_of(j), g, granules_[j].handle).IgnoreError();
        return Status(st.code(), call_text("unmap", offset, nbytes) + ": " + st.message());
      }
    }
    for (std::size_t i = first; i < first + count; ++i) {
      granules_[i].state = State::kUnmapped;
      recycle_locked(granules_[i].handle);
    }
  }
  s_.mapped_bytes -= count * g;
  s_.unmaps += count;
  BudgetDelta d;
  d.mapped = -static_cast<std::int64_t>(count * g);
  d.pending = backend_->caps().deferred_unmap ? static_cast<std::int64_t>(count * g) : 0;
  budget_->apply(d);
  return Status::Ok();
}

void Arena::recycle_locked(PhysHandle handle) {
  const std::size_t g = granularity_;
  if (s_.cached_bytes + g <= reuse_bytes_ || !backend_->release(handle, g).ok()) {
    // Within the allowance, or the release failed: either way the handle is still ours.
    cache_.push_back(handle);
    s_.cached_bytes += g;
    BudgetDelta d;
    d.cached = static_cast<std::int64_t>(g);
    budget_->apply(d);
    return;
  }
  s_.releases += 1;
  s_.held_bytes -= g;
  budget_->uncharge(g);
}

Status Arena::reap_locked(bool wait) {
  Status first_error;
  const std::size_t g = granularity_;
  for (auto it = pending_.begin(); it != pending_.end();) {
    // Done once the work on every fenced stream is; asked in order, stopping at the first not
    // done (its events are asked again next time: a query does not change them).
    bool done = true;
    Status st;
    for (Fence f : it->fences) {
      bool d = false;
      st = wait ? backend_->fence_wait(f) : backend_->fence_done(f, &d);
      if (wait && st.ok()) d = true;
      if (!st.ok() || !d) {
        done = false;
        break;
      }
    }
    if (!st.ok() || !done) {
      if (!st.ok() && first_error.ok()) first_error = st;
      ++it;
      continue;
    }
    std::vector<std::size_t> left;  // granules whose unmap failed stay pending on this batch
    for (std::size_t i : it->granules) {
      Granule& gr = granules_[i];
      if (gr.state != State::kPending || gr.batch != it->serial) continue;  // revived since
      Status ust = backend_->unmap(addr_of(i), g);
      if (!ust.ok()) {
        if (first_error.ok()) first_error = ust;
        left.push_back(i);
        continue;
      }
      gr.state = State::kUnmapped;
      s_.pending_bytes -= g;
      BudgetDelta d;
      d.pending = -static_cast<std::int64_t>(g);
      budget_->apply(d);
      recycle_locked(gr.handle);
    }
    if (!left.empty()) {
      it->granules = std::move(left);
      ++it;
      continue;
    }
    for (Fence f : it->fences) backend_->destroy_fence(f);
    it = pending_.erase(it);
  }
  return first_error;
}

Status Arena::release_cache_locked(std::size_t keep_bytes, std::size_t* released) {
  const std::size_t g = granularity_;
  Status first_error;
  std::vector<PhysHandle> kept;
  while (!cache_.empty() && s_.cached_bytes > keep_bytes) {
    PhysHandle h = cache_.back();
    cache_.pop_back();
    Status st = backend_->release(h, g);
    if (!st.ok()) {
      if (first_error.ok()) first_error = st;
      kept.push_back(h);
      continue;
    }
    s_.cached_bytes -= g;
    s_.held_bytes -= g;
    s_.releases += 1;
    *released += g;
    BudgetDelta d;
    d.cached = -static_cast<std::int64_t>(g);
    budget_->apply(d);
    budget_->uncharge(g);
  }
  cache_.insert(cache_.end(), kept.begin(), kept.end());
  return first_error;
}

Status Arena::trim(std::size_t* released, bool wait) {
  std::lock_guard<std::mutex> lock(mu_);
  *released = 0;
  EKV_RETURN_IF_ERROR(check_open("trim"));
  const std::uint64_t releases_before = s_.releases;
  Status st = reap_locked(wait);
  // Handles released while finishing pending unmaps (beyond the allowance) count too.
  *released = (s_.releases - releases_before) * granularity_;
  Status st2 = release_cache_locked(0, released);
  if (!st.ok()) return Status(st.code(), "Arena.trim: " + st.message());
  if (!st2.ok()) return Status(st2.code(), "Arena.trim: " + st2.message());
  return Status::Ok();
}

Status Arena::poll(std::size_t* finished) {
  std::lock_guard<std::mutex> lock(mu_);
  *finished = 0;
  EKV_RETURN_IF_ERROR(check_open("poll"));
  const std::size_t pending_before = s_.pending_bytes;
  Status st = reap_locked(false);
  *finished = pending_before - s_.pending_bytes;
  if (!st.ok()) return Status(st.code(), "Arena.poll: " + st.message());
  return Status::Ok();
}

Status Arena::set_reuse_bytes(std::size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_open("set_reuse_bytes"));
  reuse_bytes_ = std::min(nbytes, capacity_);
  s_.reuse_bytes = reuse_bytes_;
  std::size_t released = 0;
  return release_cache_locked(reuse_bytes_, &released);
}

Status Arena::is_mapped(std::size_t offset, std::size_t nbytes, bool* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_range("is_mapped", offset, nbytes));
  const std::size_t first = offset / granularity_;
  const std::size_t count = nbytes / granularity_;
  *out = true;
  for (std::size_t i = first; i < first + count; ++i) {
    if (granules_[i].state != State::kMapped) {
      *out = false;
      break;
    }
  }
  return Status::Ok();
}

Status Arena::check_copy(const char* call, std::size_t offset, std::size_t nbytes) const {
  EKV_RETURN_IF_ERROR(check_open(call));
  if (offset > capacity_ || nbytes > capacity_ - offset) {
    return InvalidArgument(call_text(call, offset, nbytes) + ": range ends past the arena's capacity (" +
                           std::to_string(capacity_) + " bytes)");
  }
  if (nbytes == 0) return Status::Ok();
  for (std::size_t i = offset / granularity_; i <= (offset + nbytes - 1) / granularity_; ++i) {
    if (granules_[i].state != State::kMapped) {
      return InvalidArgument(call_text(call, offset, nbytes) + ": the granule at offset " +
                             std::to_string(i * granularity_) + " is not mapped");
    }
  }
  return Status::Ok();
}

Status Arena::copy_to_host(void* dst, std::size_t offset, std::size_t nbytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_copy("copy_to_host", offset, nbytes));
  if (nbytes == 0) return Status::Ok();
  return backend_->copy_to_host(dst, base_ + offset, nbytes);
}

Status Arena::copy_from_host(std::size_t offset, const void* src, std::size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  EKV_RETURN_IF_ERROR(check_copy("copy_from_host", offset, nbytes));
  if (nbytes == 0) return Status::Ok();
  return backend_->copy_from_host(base_ + offset, src, nbytes);
}

ArenaStats Arena::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return s_;
}

Status Arena::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A retry gives back what an earlier close() could not (nothing, once it all went back).
    if (closed_) return release_closed_locked(Status::Ok());
    if (closing_) return Status::Ok();  // another thread is closing it
    closing_ = true;
  }
  // Registry before arena lock (see budget.h); after this no set_budget reaches us.
  budget_->unregister_arena(this, capacity_);
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  Status first_error;
  if (!in_forked_child()) {
    // Granules still mapped may be in use by device work queued on any stream (torch's side
    // streams do not order with the default stream, so a fence there would not cover them):
    // closing waits for the whole device, once.
    bool any_mapped = false;
    for (const Granule& gr : granules_) any_mapped = any_mapped || gr.state == State::kMapped;
    if (any_mapped && backend_->caps().deferred_unmap) first_error = backend_->synchronize();
    Status reaped = reap_locked(true);
    if (first_error.ok()) first_error = reaped;
    for (PendingBatch& b : pending_) {
      for (Fence f : b.fences) backend_->destroy_fence(f);
    }
  }
  pending_.clear();
  // Whatever is still mapped (pending granules are, in the driver) is given back below like
  // the cached handles; until it is, it counts as cached: held, and of no use to anyone.
  for (Granule& gr : granules_) {
    if (gr.state == State::kPending) gr.state = State::kMapped;
  }
  BudgetDelta d;
  d.mapped = -static_cast<std::int64_t>(s_.mapped_bytes);
  d.pending = -static_cast<std::int64_t>(s_.pending_bytes);
  d.cached = static_cast<std::int64_t>(s_.mapped_bytes + s_.pending_bytes);
  budget_->apply(d);
  s_.cached_bytes += s_.mapped_bytes + s_.pending_bytes;
  s_.mapped_bytes = s_.pending_bytes = 0;
  return release_closed_locked(first_error);
}

Status Arena::release_closed_locked(Status first_error) {
  auto note = [&first_error](const Status& st) {
    if (!st.ok() && first_error.ok()) first_error = st;
  };
  // In a forked child the memory is the parent's: the books are closed (the child's budget
  // stops counting it) but nothing is unmapped, released or freed through the backend.
  const bool owner = !in_forked_child();
  const std::size_t g = granularity_;
  std::size_t still_mapped = 0;
  for (std::size_t i = 0; i < granules_.size(); ++i) {
    Granule& gr = granules_[i];
    if (gr.state == State::kUnmapped) continue;
    Status st = owner ? backend_->unmap(addr_of(i), g) : Status::Ok();
    if (!st.ok()) {
      note(st);
      ++still_mapped;  // kept mapped in the table, for the next close()
      continue;
    }
    gr.state = State::kUnmapped;
    if (owner) cache_.push_back(gr.handle);  // released with the cached handles, just below
  }
  std::vector<PhysHandle> kept;
  for (PhysHandle h : cache_) {
    if (!owner) break;
    Status st = backend_->release(h, g);
    if (!st.ok()) {
      note(st);
      kept.push_back(h);
      continue;
    }
    s_.releases += 1;
  }
  cache_ = std::move(kept);
  // The driver refuses to free a range that still has mappings inside.
  if (range_held_ && still_mapped == 0) {
    Status st = owner ? backend_->free_range(base_, capacity_) : Status::Ok();
    if (st.ok()) {
      range_held_ = false;
      s_.reserved_bytes = 0;
    } else {
      note(st);
    }
  }
  const std::size_t held = (still_mapped + cache_.size()) * g;
  BudgetDelta d;
  d.cached = static_cast<std::int64_t>(held) - static_cast<std::int64_t>(s_.cached_bytes);
  budget_->apply(d);
  budget_->uncharge(s_.held_bytes - held);
  s_.cached_bytes = s_.held_bytes = held;
  if (first_error.ok()) return Status::Ok();
  // A cleanup failure is the driver's, whatever code the call returned (never the caller's
  // ValueError nor a MemoryError to retry with less).
  if (held == 0 && !range_held_) {
    return DriverError("Arena.close: " + first_error.message() + "; everything was given back all the same");
  }
  std::string left;
  auto add = [&left](const std::string& part) { left += (left.empty() ? "" : ", ") + part; };
  if (still_mapped != 0) {
    add(std::to_string(still_mapped) + " mapped granules (" + std::to_string(still_mapped * g) + " bytes)");
  }
  if (!cache_.empty()) {
    add(std::to_string(cache_.size()) + " physical handles (" + std::to_string(cache_.size() * g) + " bytes)");
  }
  if (range_held_) {
    char base[32];
    std::snprintf(base, sizeof(base), "0x%llx", static_cast<unsigned long long>(base_));
    add("the " + std::to_string(capacity_) + "-byte address range at " + base);
  }
  return DriverError("Arena.close: " + first_error.message() + "; not given back: " + left + "; close() again retries");
}

}  // namespace ekv
