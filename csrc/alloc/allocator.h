// allocator.h — the process-wide door to the per-device allocators (device_allocator.h).
//
// Reached from the C ABI (c_abi.cpp, which has no handle to pass) and from the bindings. It
// turns a DeviceAllocator's Status into a null pointer plus a message readable through
// last_error(), and owns what is process-wide by nature: the tag names and the thread's tag.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "alloc/device_allocator.h"
#include "alloc/tag_pause.h"
#include "core/status.h"

namespace ekv {

// The process-wide door: per-device allocators, tag names, the last error. Reached from the C
// ABI (which has no handle to pass) and from the bindings; never destroyed, so frees that
// arrive while the process exits find it alive.
class Allocator {
 public:
  static Allocator& instance();

  // C ABI semantics: never throw; failures return null / change nothing and set last_error.
  void* malloc(std::size_t size, int device, void* stream) noexcept;
  void free(void* ptr, std::size_t size, int device, void* stream) noexcept;

  // The device's allocator, created on first use. Shared: close() may drop it meanwhile.
  Status device(int device, std::shared_ptr<DeviceAllocator>* out);
  std::vector<std::shared_ptr<DeviceAllocator>> devices();
  // Drops the device's allocator (its arena and address reservation) if nothing is allocated
  // or paused there; the next malloc on the device starts a fresh one. An arena the driver
  // would not give back whole is kept aside and named in the error; the next close(device)
  // retries it.
  Status close(int device);
  // Devices with such an arena kept aside.
  std::vector<int> unclosed_devices();
  // Address space each device reserves when first used (0 = default). Only before first use.
  void set_reserve_bytes(std::size_t nbytes);

  TagId tag_id(const std::string& name);
  std::string tag_name(TagId id);
  bool find_tag(const std::string& name, TagId* id);
  // The tag of allocations made by this thread from now on ("" = untagged).
  static TagId thread_tag();
  static void set_thread_tag(TagId id);

  void record_error(const std::string& message);
  std::optional<std::string> last_error(bool clear);

 private:
  Allocator();
  std::mutex mu_;
  std::map<int, std::shared_ptr<DeviceAllocator>> devices_;
  std::multimap<int, std::shared_ptr<DeviceAllocator>> unclosed_;  // dropped, arena not all given back
  std::size_t reserve_bytes_ = 0;
  std::mutex tags_mu_;
  std::vector<std::string> tag_names_;
  std::unordered_map<std::string, TagId> tag_ids_;
  std::mutex error_mu_;
  std::optional<std::string> last_error_;
};

}  // namespace ekv
