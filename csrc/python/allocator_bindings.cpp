// allocator_bindings.cpp — the allocator's Python face inside torch_elastic_kv._C.
//
// Functions, not a class: the allocator is the process-wide one the C ABI (c_abi.cpp) serves,
// so Python reaches the same state torch allocates from. Devices are ints (-1 = host).
// Status -> exception as in bindings.cpp: kInvalidArgument -> ValueError, kOutOfMemory ->
// MemoryError (torch_elastic_kv.allocator turns it into torch.OutOfMemoryError on CUDA),
// anything else -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "alloc/allocator.h"
#include "python/py_status.h"

namespace py = pybind11;

namespace ekv {
namespace {

std::shared_ptr<DeviceAllocator> device_or_raise(int device) {
  std::shared_ptr<DeviceAllocator> d;
  Status st;
  {
    py::gil_scoped_release nogil;
    st = Allocator::instance().device(device, &d);
  }
  throw_if_error(st);
  return d;
}

// The device's allocator if it has been used, else nullptr (nothing to trim or pause there).
std::shared_ptr<DeviceAllocator> existing(int device) {
  for (auto& d : Allocator::instance().devices()) {
    if (d->device() == device) return d;
  }
  return nullptr;
}

TagId known_tag(const char* call, const std::string& tag) {
  TagId id = 0;
  if (!Allocator::instance().find_tag(tag, &id)) {
    throw py::value_error(std::string(call) + "(tag='" + tag + "'): no allocation was ever made with this tag");
  }
  return id;
}

py::dict stats_dict(const AllocatorStats& s) {
  py::dict d;
  d["device"] = s.device;
  d["granularity"] = s.granularity;
  d["reserved_bytes"] = s.reserved_bytes;
  d["mapped_bytes"] = s.mapped_bytes;
  d["allocated_bytes"] = s.allocated_bytes;
  d["requested_bytes"] = s.requested_bytes;
  d["cached_bytes"] = s.cached_bytes;
  d["pending_free_bytes"] = s.pending_free_bytes;
  d["paused_bytes"] = s.paused_bytes;
  d["backup_bytes"] = s.backup_bytes;
  d["peak_allocated_bytes"] = s.peak_allocated_bytes;
  d["peak_mapped_bytes"] = s.peak_mapped_bytes;
  d["limit_bytes"] = s.limit_bytes ? py::cast(*s.limit_bytes) : py::none();
  d["mallocs"] = s.mallocs;
  d["frees"] = s.frees;
  d["failed_mallocs"] = s.failed_mallocs;
  d["failed_frees"] = s.failed_frees;
  d["maps"] = s.maps;
  d["unmaps"] = s.unmaps;
  d["free_event_failures"] = s.free_event_failures;
  d["events_recorded"] = s.events_recorded;
  d["leaked_events"] = s.leaked_events;
  d["live_blocks"] = s.live_blocks;
  d["segments"] = s.segments;
  py::dict tags;
  for (const TagStats& t : s.tags) {
    py::dict td;
    td["allocated_bytes"] = t.allocated_bytes;
    td["requested_bytes"] = t.requested_bytes;
    td["mapped_bytes"] = t.mapped_bytes;
    td["paused_bytes"] = t.paused_bytes;
    td["backup_bytes"] = t.backup_bytes;
    td["blocks"] = t.blocks;
    td["paused"] = t.paused;
    tags[py::str(t.tag)] = td;
  }
  d["tags"] = tags;
  return d;
}

}  // namespace

void bind_allocator(py::module_& m) {
  m.def(
      "allocator_stats", [](int device) { return stats_dict(device_or_raise(device)->stats()); }, py::arg("device"),
      "Byte and event counts of the allocator on a device (-1 = host).");
  m.def(
      "allocator_snapshot",
      [](int device) {
        py::list out;
        std::shared_ptr<DeviceAllocator> d = existing(device);
        if (d == nullptr) return out;
        for (const BlockInfo& b : d->snapshot()) {
          py::dict e;
          e["device"] = device;
          e["address"] = b.address;
          e["size"] = b.size;
          e["block_size"] = b.block_size;
          e["tag"] = b.tag;
          e["stream"] = b.stream;
          e["paused"] = b.paused;
          e["small"] = b.small;
          out.append(e);
        }
        return out;
      },
      py::arg("device"), "Live allocations on a device, by address.");
  m.def(
      "allocator_trim",
      [](int device) {
        std::shared_ptr<DeviceAllocator> d = existing(device);
        if (d == nullptr) return std::size_t(0);
        std::size_t released = 0;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = d->trim(&released);
        }
        throw_if_error(st);
        return released;
      },
      py::arg("device"), "Give every cached granule back; returns the bytes released.");
  m.def(
      "allocator_set_limit",
      [](std::optional<std::int64_t> nbytes, int device) {
        std::optional<std::size_t> limit;
        if (nbytes) {
          if (*nbytes < 0)
            throw py::value_error("set_limit(nbytes=" + std::to_string(*nbytes) + "): must be >= 0 or None");
          limit = static_cast<std::size_t>(*nbytes);
        }
        std::shared_ptr<DeviceAllocator> d = device_or_raise(device);
        Status st;
        {
          py::gil_scoped_release nogil;
          st = d->set_limit(limit);
        }
        throw_if_error(st);
      },
      py::arg("nbytes"), py::arg("device"));
  m.def(
      "allocator_pause",
      [](const std::string& tag, bool backup, int device) {
        TagId id = known_tag("pause", tag);
        std::shared_ptr<DeviceAllocator> d = device_or_raise(device);
        std::size_t released = 0;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = d->pause(id, backup, &released);
        }
        throw_if_error(st);
        return released;
      },
      py::arg("tag"), py::arg("backup"), py::arg("device"),
      "Unmap the tag's granules, keeping addresses (and a host copy with backup); returns bytes released.");
  m.def(
      "allocator_resume",
      [](const std::string& tag, int device) {
        TagId id = known_tag("resume", tag);
        std::shared_ptr<DeviceAllocator> d = device_or_raise(device);
        Status st;
        {
          py::gil_scoped_release nogil;
          st = d->resume(id);
        }
        throw_if_error(st);
      },
      py::arg("tag"), py::arg("device"));
  m.def(
      "allocator_close",
      [](int device) {
        Status st;
        {
          py::gil_scoped_release nogil;
          st = Allocator::instance().close(device);
        }
        throw_if_error(st);
      },
      py::arg("device"),
      "Drop the device's allocator and its address reservation; refused while in use; retries what an earlier "
      "close could not give back.");
  m.def(
      "allocator_devices",
      [] {
        std::vector<int> out;
        for (auto& d : Allocator::instance().devices()) out.push_back(d->device());
        return out;
      },
      "Devices the allocator has state on.");
  m.def(
      "allocator_unclosed_devices", [] { return Allocator::instance().unclosed_devices(); },
      "Devices whose dropped allocator's memory a failed close() could not all give back (close retries it).");
  m.def(
      "allocator_set_thread_tag",
      [](const std::string& tag) {
        std::string prev = Allocator::instance().tag_name(Allocator::thread_tag());
        Allocator::set_thread_tag(Allocator::instance().tag_id(tag));
        return prev;
      },
      py::arg("tag"), "Tag this thread's allocations from now on; returns the previous tag ('' = none).");
  m.def("allocator_thread_tag", [] { return Allocator::instance().tag_name(Allocator::thread_tag()); });
  m.def(
      "allocator_last_error", [](bool clear) { return Allocator::instance().last_error(clear); },
      py::arg("clear") = false, "Message of the last failed ekv_malloc/ekv_free, or None.");
  m.def(
      "allocator_set_reserve_bytes",
      [](std::int64_t nbytes) {
        if (nbytes < 0) throw py::value_error("reserve_bytes=" + std::to_string(nbytes) + " must be >= 0");
        Allocator::instance().set_reserve_bytes(static_cast<std::size_t>(nbytes));
      },
      py::arg("nbytes"), "Address space each device reserves on first use (0 = default).");
}

}  // namespace ekv
