// host_memory.cpp — reads /proc/meminfo and the memory cgroup's limit and usage.
#include "core/host_memory.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <vector>

namespace ekv {
namespace {

constexpr std::size_t kMiB = std::size_t(1) << 20;
constexpr std::size_t kMinMargin = 64 * kMiB;
// cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is no limit.
constexpr std::uint64_t kNoLimit = std::uint64_t(1) << 62;

bool read_first_line(const std::string& path, std::string* line) {
  std::ifstream f(path);
  return static_cast<bool>(f) && static_cast<bool>(std::getline(f, *line));
}

// A byte count file ("123\n"; cgroup v2 writes "max" for no limit).
std::optional<std::uint64_t> read_bytes(const std::string& path) {
  std::string line;
  if (!read_first_line(path, &line)) return std::nullopt;
  if (line.rfind("max", 0) == 0) return kNoLimit;
  try {
    return static_cast<std::uint64_t>(std::stoull(line));
  } catch (...) {
    return std::nullopt;
  }
}

std::string parent_of(const std::string& dir) {
  const std::size_t slash = dir.find_last_of('/');
  return slash == std::string::npos || slash == 0 ? std::string() : dir.substr(0, slash);
}

// Folders from the process's own cgroup up to the root of the hierarchy at `mount`. Inside a
// container the path in /proc/self/cgroup may not exist under the mount (the container sees
// its own cgroup as the root), so the mount itself is always tried last.
std::vector<std::string> cgroup_dirs(const std::string& mount, std::string rel) {
  std::vector<std::string> dirs;
  while (!rel.empty() && rel != "/") {
    dirs.push_back(mount + rel);
    rel = parent_of(rel);
  }
  dirs.push_back(mount);
  return dirs;
}

void consider(HostMemory* m, const std::string& limit_file, const std::string& usage_file) {
  std::optional<std::uint64_t> limit = read_bytes(limit_file);
  if (!limit || *limit >= kNoLimit) return;
  std::uint64_t usage = read_bytes(usage_file).value_or(0);
  const std::size_t room = *limit > usage ? static_cast<std::size_t>(*limit - usage) : 0;
  const std::size_t best_room =
      m->cgroup_limit ? (*m->cgroup_limit > m->cgroup_usage ? *m->cgroup_limit - m->cgroup_usage : 0) : SIZE_MAX;
  if (room < best_room) {
    m->cgroup_limit = static_cast<std::size_t>(*limit);
    m->cgroup_usage = static_cast<std::size_t>(usage);
    m->cgroup_path = limit_file;
  }
}

void read_cgroups(HostMemory* m) {
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  while (std::getline(f, line)) {
    // "hierarchy-id:controllers:path"; v2 is "0::path".
    const std::size_t a = line.find(':');
    const std::size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string rel = line.substr(b + 1);
    if (controllers.empty()) {
      for (const std::string& dir : cgroup_dirs("/sys/fs/cgroup", rel)) {
        consider(m, dir + "/memory.max", dir + "/memory.current");
      }
    } else {
      std::stringstream names(controllers);
      std::string name;
      while (std::getline(names, name, ',')) {
        if (name != "memory") continue;
        for (const std::string& dir : cgroup_dirs("/sys/fs/cgroup/memory", rel)) {
          consider(m, dir + "/memory.limit_in_bytes", dir + "/memory.usage_in_bytes");
        }
      }
    }
  }
}

std::string mib(std::size_t n) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(1);
  s << static_cast<double>(n) / static_cast<double>(kMiB) << " MiB";
  return s.str();
}

}  // namespace

std::size_t HostMemory::available() const {
  std::size_t avail = mem_available;
  if (cgroup_limit) avail = std::min(avail, *cgroup_limit > cgroup_usage ? *cgroup_limit - cgroup_usage : 0);
  return avail;
}

std::size_t HostMemory::margin() const {
  std::size_t total = mem_total;
  if (cgroup_limit) total = std::min(total, *cgroup_limit);
  return std::max(kMinMargin, total / 64);
}

Status read_host_memory(HostMemory* out) {
  HostMemory m;
  std::ifstream f("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  bool have_total = false, have_avail = false;
  while (f >> key >> kib) {
    std::getline(f, unit);  // " kB"
    if (key == "MemTotal:") {
      m.mem_total = static_cast<std::size_t>(kib) * 1024;
      have_total = true;
    }
    if (key == "MemAvailable:") {
      m.mem_available = static_cast<std::size_t>(kib) * 1024;
      have_avail = true;
    }
  }
  if (!have_total || !have_avail) return Unavailable("host memory: /proc/meminfo has no MemTotal/MemAvailable");
  read_cgroups(&m);
  *out = m;
  return Status::Ok();
}

Status check_host_commit(std::size_t nbytes, const std::string& what) {
  HostMemory m;
  // Without /proc (not Linux as we know it) there is nothing to check against: let the
  // commit decide, as before.
  if (!read_host_memory(&m).ok()) return Status::Ok();
  const std::size_t avail = m.available();
  const std::size_t margin = m.margin();
  if (nbytes <= avail && avail - nbytes >= margin) return Status::Ok();
  std::string msg = what + ": committing " + mib(nbytes) + " of host memory would leave less than " + mib(margin) +
                    " free: the machine can give " + mib(avail) + " (MemAvailable " + mib(m.mem_available);
  if (m.cgroup_limit) {
    msg += "; cgroup limit " + mib(*m.cgroup_limit) + " with " + mib(m.cgroup_usage) + " in use, " + m.cgroup_path;
  }
  msg += ")";
  return OutOfMemory(msg);
}

}  // namespace ekv
