// host_backend.cpp — granules of CPU RAM: one memfd holds the physical memory, each handle
// is a granule-sized slot of it, and mmap places slots into a PROT_NONE reservation.
//
// Physical memory is committed at create (fallocate), so running out of RAM is a clean
// kOutOfMemory instead of a SIGBUS on first touch, and given back at release
// (fallocate PUNCH_HOLE), which is what makes Shmem in /proc/meminfo fall. Shmem past what
// the machine or its cgroup can hold is not refused by fallocate (the OOM killer answers), so
// check_commit asks host_memory.h first.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/host_memory.h"

namespace ekv {
namespace {

constexpr std::size_t kHostGranularity = std::size_t(2) << 20;  // 2 MiB, like CUDA

std::string errno_text(const char* call, int err) {
  return std::string(call) + " failed: " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}

class HostBackend final : public Backend {
 public:
  HostBackend(int fd, std::size_t slots) : fd_(fd) {
    caps_.granularity = kHostGranularity;
    caps_.deferred_unmap = false;
    caps_.host_accessible = true;
    caps_.name = "host";
    free_slots_.reserve(slots);
    // Hand out low slots first (pop_back), which keeps the memfd's used part compact.
    for (std::size_t i = slots; i > 0; --i) free_slots_.push_back(i - 1);
  }
  ~HostBackend() override { ::close(fd_); }

  const BackendCaps& caps() const override { return caps_; }

  Status reserve(std::size_t nbytes, std::uintptr_t* addr) override {
    // Over-reserve by one granule and cut the ends off, so the base is granule-aligned.
    const std::size_t g = caps_.granularity;
    void* p = ::mmap(nullptr, nbytes + g, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      std::string msg = "host reserve of " + std::to_string(nbytes) + " bytes: " + errno_text("mmap(PROT_NONE)", err);
      return err == ENOMEM ? OutOfMemory(msg) : DriverError(msg);
    }
    std::uintptr_t raw = reinterpret_cast<std::uintptr_t>(p);
    std::uintptr_t aligned = (raw + g - 1) / g * g;
    if (aligned > raw) ::munmap(p, aligned - raw);
    std::uintptr_t tail = aligned + nbytes;
    std::uintptr_t raw_end = raw + nbytes + g;
    if (raw_end > tail) ::munmap(reinterpret_cast<void*>(tail), raw_end - tail);
    *addr = aligned;
    return Status::Ok();
  }

  Status free_range(std::uintptr_t addr, std::size_t nbytes) override {
    if (::munmap(reinterpret_cast<void*>(addr), nbytes) != 0)
      return DriverError("host free_range: " + errno_text("munmap", errno));
    return Status::Ok();
  }

  Status create(std::size_t nbytes, PhysHandle* out) override {
    if (nbytes != caps_.granularity) {
      return InvalidArgument("host create: size " + std::to_string(nbytes) + " is not one granule (" +
                             std::to_string(caps_.granularity) + ")");
    }
    std::size_t slot;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_slots_.empty()) return OutOfMemory("host create: every slot of the arena's memfd is in use");
      slot = free_slots_.back();
      free_slots_.pop_back();
    }
    off_t off = static_cast<off_t>(slot * caps_.granularity);
    if (::fallocate(fd_, 0, off, static_cast<off_t>(nbytes)) != 0) {
      int err = errno;
      std::lock_guard<std::mutex> lock(mu_);
      free_slots_.push_back(slot);
      std::string msg = errno_text("fallocate", err) + " committing " + std::to_string(nbytes) + " bytes";
      if (err == ENOSPC || err == ENOMEM) return OutOfMemory("host create: " + msg);
      return DriverError("host create: " + msg);
    }
    *out = static_cast<PhysHandle>(slot);
    return Status::Ok();
  }

  Status check_commit(std::size_t nbytes) override { return check_host_commit(nbytes, "host backend"); }

  Status map(std::uintptr_t addr, std::size_t nbytes, PhysHandle handle) override {
    off_t off = static_cast<off_t>(handle * caps_.granularity);
    void* p = ::mmap(reinterpret_cast<void*>(addr), nbytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_, off);
    if (p == MAP_FAILED) {
      int err = errno;
      // MAP_FIXED may have replaced the reservation before failing: put it back.
      ::mmap(reinterpret_cast<void*>(addr), nbytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
             -1, 0);
      std::string msg = "host map: " + errno_text("mmap(MAP_FIXED|MAP_SHARED)", err);
      return err == ENOMEM ? OutOfMemory(msg) : DriverError(msg);
    }
    return Status::Ok();
  }

  Status unmap(std::uintptr_t addr, std::size_t nbytes) override {
    // Replace the shared mapping with reserved-but-inaccessible space: the range stays ours.
    void* p = ::mmap(reinterpret_cast<void*>(addr), nbytes, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return DriverError("host unmap: " + errno_text("mmap(PROT_NONE, MAP_FIXED)", errno));
    return Status::Ok();
  }

  Status release(PhysHandle handle, std::size_t nbytes) override {
    off_t off = static_cast<off_t>(handle * caps_.granularity);
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, static_cast<off_t>(nbytes)) != 0) {
      return DriverError("host release: " + errno_text("fallocate(PUNCH_HOLE)", errno));
    }
    std::lock_guard<std::mutex> lock(mu_);
    free_slots_.push_back(static_cast<std::size_t>(handle));
    return Status::Ok();
  }

  Status copy_to_host(void* dst, std::uintptr_t src, std::size_t nbytes) override {
    std::memcpy(dst, reinterpret_cast<const void*>(src), nbytes);
    return Status::Ok();
  }

  Status copy_from_host(std::uintptr_t dst, const void* src, std::size_t nbytes) override {
    std::memcpy(reinterpret_cast<void*>(dst), src, nbytes);
    return Status::Ok();
  }

  Status device_memory(std::size_t* free_bytes, std::size_t* total_bytes) override {
    HostMemory m;
    EKV_RETURN_IF_ERROR(read_host_memory(&m));
    *free_bytes = m.available();
    *total_bytes = m.cgroup_limit ? std::min(m.mem_total, *m.cgroup_limit) : m.mem_total;
    return Status::Ok();
  }

 private:
  int fd_;
  BackendCaps caps_;
  std::mutex mu_;
  std::vector<std::size_t> free_slots_;
};

}  // namespace

Status make_host_backend(std::size_t max_bytes, std::unique_ptr<Backend>* out) {
  const std::size_t g = kHostGranularity;
  std::size_t slots = (max_bytes + g - 1) / g;
  int fd = ::memfd_create("torch_elastic_kv", MFD_CLOEXEC);
  if (fd < 0) return Unavailable("host backend: " + errno_text("memfd_create", errno));
  // Sparse: ftruncate allocates nothing, fallocate at create does.
  if (::ftruncate(fd, static_cast<off_t>(slots * g)) != 0) {
    int err = errno;
    ::close(fd);
    return Unavailable("host backend: " + errno_text("ftruncate", err) + " sizing memfd to " +
                       std::to_string(slots * g) + " bytes");
  }
  *out = std::make_unique<HostBackend>(fd, slots);
  return Status::Ok();
}

}  // namespace ekv
