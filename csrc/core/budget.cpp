// budget.cpp — per-device byte budgets.
#include "core/budget.h"

#include <algorithm>
#include <map>
#include <utility>

#include "core/arena.h"

namespace ekv {

std::shared_ptr<Budget> Budget::for_device(DeviceKind kind, int index) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::shared_ptr<Budget>> budgets;
  std::lock_guard<std::mutex> lock(mu);
  int key_index = kind == DeviceKind::kHost ? 0 : index;
  auto key = std::make_pair(static_cast<int>(kind), key_index);
  auto it = budgets.find(key);
  if (it == budgets.end()) {
    std::string name = kind == DeviceKind::kHost ? "cpu" : "cuda:" + std::to_string(index);
    it = budgets.emplace(key, std::make_shared<Budget>(name)).first;
  }
  return it->second;
}

static std::string limit_text(const std::optional<std::size_t>& limit) {
  return limit ? std::to_string(*limit) + " bytes" : std::string("unlimited");
}

Status Budget::try_charge(std::size_t nbytes, const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (s_.limit_bytes && s_.held_bytes + nbytes > *s_.limit_bytes) {
    return OutOfMemory(what + ": needs " + std::to_string(nbytes) + " more bytes of physical memory but the " + name_ +
                       " budget is " + limit_text(s_.limit_bytes) + " with " + std::to_string(s_.held_bytes) +
                       " held (" + std::to_string(s_.mapped_bytes) + " mapped, " + std::to_string(s_.pending_bytes) +
                       " pending release, " + std::to_string(s_.cached_bytes) +
                       " cached; Arena.trim() gives cached bytes back)");
  }
  s_.held_bytes += nbytes;
  return Status::Ok();
}

std::size_t Budget::shortfall(std::size_t nbytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!s_.limit_bytes || s_.held_bytes + nbytes <= *s_.limit_bytes) return 0;
  return s_.held_bytes + nbytes - *s_.limit_bytes;
}

void Budget::uncharge(std::size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  s_.held_bytes -= std::min(nbytes, s_.held_bytes);
}

void Budget::apply(const BudgetDelta& d) {
  std::lock_guard<std::mutex> lock(mu_);
  s_.mapped_bytes = static_cast<std::size_t>(static_cast<std::int64_t>(s_.mapped_bytes) + d.mapped);
  s_.pending_bytes = static_cast<std::size_t>(static_cast<std::int64_t>(s_.pending_bytes) + d.pending);
  s_.cached_bytes = static_cast<std::size_t>(static_cast<std::int64_t>(s_.cached_bytes) + d.cached);
}

Status Budget::set_limit(std::optional<std::size_t> limit) {
  std::lock_guard<std::mutex> reg(registry_mu_);
  // Caller holds mu_. Refuses a limit below the bytes in use (mapped + pending).
  auto below_in_use = [&]() -> Status {
    std::size_t in_use = s_.mapped_bytes + s_.pending_bytes;
    if (!limit || *limit >= in_use) return Status::Ok();
    return InvalidArgument(
        "set_budget(" + std::to_string(*limit) + ", device='" + name_ + "'): below the " + std::to_string(in_use) +
        " bytes in use (" + std::to_string(s_.mapped_bytes) + " mapped, " + std::to_string(s_.pending_bytes) +
        " pending release); unmap first, the budget is unchanged (" + limit_text(s_.limit_bytes) + ")");
  };
  bool need_trim = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    EKV_RETURN_IF_ERROR(below_in_use());
    need_trim = limit && *limit < s_.held_bytes;
  }
  if (need_trim) {
    for (Arena* a : arenas_) {
      std::size_t released = 0;
      // Best effort: a failed release keeps its handle cached and counted, and the check below
      // decides on the bytes actually held.
      a->trim(&released).IgnoreError();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  // Arenas map concurrently (their locks were free while trimming): check again where the
  // limit is set, so it never lands below what is in use.
  EKV_RETURN_IF_ERROR(below_in_use());
  s_.limit_bytes = limit;
  return Status::Ok();
}

std::size_t Budget::reclaim_cached(const Arena* requester, std::size_t nbytes) {
  std::unique_lock<std::mutex> reg(registry_mu_, std::try_to_lock);
  if (!reg.owns_lock()) return 0;
  std::size_t released = 0;
  for (Arena* a : arenas_) {
    if (a == requester || released >= nbytes) continue;
    released += a->try_release_cached(nbytes - released);
  }
  return released;
}

BudgetStats Budget::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return s_;
}

void Budget::register_arena(Arena* arena, std::size_t reserved_bytes) {
  std::lock_guard<std::mutex> reg(registry_mu_);
  arenas_.push_back(arena);
  std::lock_guard<std::mutex> lock(mu_);
  s_.reserved_bytes += reserved_bytes;
  s_.arenas += 1;
}

void Budget::unregister_arena(Arena* arena, std::size_t reserved_bytes) {
  std::lock_guard<std::mutex> reg(registry_mu_);
  arenas_.erase(std::remove(arenas_.begin(), arenas_.end(), arena), arenas_.end());
  std::lock_guard<std::mutex> lock(mu_);
  s_.reserved_bytes -= std::min(reserved_bytes, s_.reserved_bytes);
  s_.arenas -= 1;
}

}  // namespace ekv
