// allocator.cpp — the process-wide door; see allocator.h.
#include "alloc/allocator.h"

#include <exception>
#include <utility>

namespace ekv {
namespace {

thread_local TagId t_thread_tag = 0;

}  // namespace

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
        record_error("ekv_malloc(size=" + std::to_string(size) + ", device=" + std::to_string(device) +
                     "): " + st.message());
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
      record_error("ekv_free(ptr=" + hex_text(reinterpret_cast<std::uintptr_t>(ptr)) +
                   ", size=" + std::to_string(size) + ", device=" + std::to_string(device) +
                   "): this allocator has made no allocation on that device; "
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
