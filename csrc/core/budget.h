// budget.h — one byte budget per device, drawn from by every arena on that device.
//
// The budget counts physical bytes held (handles created and not yet released: mapped,
// waiting for the device to finish with them, or cached for reuse). It can be changed while
// arenas live; lowering it below the bytes in use (mapped + pending) is refused, and lowering
// it below the bytes held first asks the device's arenas to drop cached handles.
//
// Budgets are per process by nature (the device is), so they live in a registry keyed by
// device; `Budget::for_device` is the only way to reach one.
//
// Lock order: registry -> arena -> budget. An arena calls into its budget while holding its
// own lock; only set_limit (holding the registry lock) locks arenas, and reclaim_cached, which
// an arena may call while holding its own lock, only ever try-locks (registry and arenas).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/status.h"

namespace ekv {

class Arena;

struct BudgetStats {
  std::optional<std::size_t> limit_bytes;  // nullopt = unlimited
  std::size_t held_bytes = 0;              // mapped + pending + cached
  std::size_t mapped_bytes = 0;
  std::size_t pending_bytes = 0;  // unmapped by the caller, device not yet done with them
  std::size_t cached_bytes = 0;
  std::size_t reserved_bytes = 0;  // address space of live arenas
  std::size_t arenas = 0;
};

// Signed changes to the counters, applied together under the budget's lock.
struct BudgetDelta {
  std::int64_t mapped = 0;
  std::int64_t pending = 0;
  std::int64_t cached = 0;
};

class Budget {
 public:
  static std::shared_ptr<Budget> for_device(DeviceKind kind, int index);

  // "cpu", "cuda:0"
  const std::string& name() const { return name_; }

  // Charge `nbytes` of new physical memory; kOutOfMemory (naming the numbers) if it would
  // pass the limit. `what` names the caller's request for the message.
  Status try_charge(std::size_t nbytes, const std::string& what);
  void uncharge(std::size_t nbytes);
  // How many bytes charging `nbytes` now would pass the limit by (0 if it fits).
  std::size_t shortfall(std::size_t nbytes) const;
  void apply(const BudgetDelta& delta);

  // Asks the device's other arenas to release up to `nbytes` of cached handles, skipping any
  // that is busy (try-lock only, so it is safe to call while holding an arena's lock).
  // Returns the bytes released.
  std::size_t reclaim_cached(const Arena* requester, std::size_t nbytes);

  // Change the limit (nullopt = unlimited). Refused, with nothing changed, below in-use bytes.
  Status set_limit(std::optional<std::size_t> limit);
  BudgetStats stats() const;

  // Arenas register for their lifetime so that set_limit can ask them to drop cached handles.
  void register_arena(Arena* arena, std::size_t reserved_bytes);
  void unregister_arena(Arena* arena, std::size_t reserved_bytes);

  explicit Budget(std::string name) : name_(std::move(name)) {}

 private:
  std::string name_;
  std::mutex registry_mu_;  // guards arenas_; taken before any arena's lock
  std::vector<Arena*> arenas_;
  mutable std::mutex mu_;  // guards the counters; taken after any arena's lock
  BudgetStats s_;
};

}  // namespace ekv
