// host_memory.h — what this machine can still give the host backend: the kernel's
// MemAvailable and the room left under the process's memory cgroup (v1 or v2), whichever is
// smaller.
//
// Why: the host backend commits memfd pages with fallocate, and shmem past what the machine
// (or the container's cgroup) can hold is not refused — the kernel OOM killer ends the
// process instead. The backend asks here before committing and refuses with numbers.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include "core/status.h"

namespace ekv {

struct HostMemory {
  std::size_t mem_total = 0;                // MemTotal
  std::size_t mem_available = 0;            // MemAvailable (the kernel's estimate, page cache included)
  std::optional<std::size_t> cgroup_limit;  // tightest memory limit on the cgroup path
  std::size_t cgroup_usage = 0;             // usage of the cgroup holding that limit
  std::string cgroup_path;                  // the limit's file, for messages
  // Bytes that can be committed now: MemAvailable, capped by the cgroup's room.
  std::size_t available() const;
  // Bytes kept free for everything else in the process (Python, torch, the model).
  std::size_t margin() const;
};

Status read_host_memory(HostMemory* out);

// Ok when `nbytes` more can be committed with the margin left over; otherwise kOutOfMemory
// naming the request, what is available and where the limit comes from. `what` names the
// caller for the message.
Status check_host_commit(std::size_t nbytes, const std::string& what);

}  // namespace ekv
