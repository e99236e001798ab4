// bindings.cpp — the pybind11 module torch_elastic_kv._C.
//
// One bind_* function per concept; each translates Status into the Python exception the
// contract names (docs/INTERFACES.md): kInvalidArgument -> ValueError, kOutOfMemory ->
// MemoryError (the Python layer turns it into torch.OutOfMemoryError on CUDA), anything else
// -> RuntimeError. Numbers come in as Python ints and are checked for sign here, so a
// negative size is a ValueError naming the call rather than a pybind11 TypeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "core/arena.h"
#include "core/budget.h"
#include "core/driver_probe.h"
#include "core/host_memory.h"
#include "core/status.h"
#include "python/py_status.h"

namespace py = pybind11;

namespace ekv {
namespace {

std::size_t non_negative(const char* call, const char* name, std::int64_t value) {
  if (value < 0) {
    throw py::value_error(std::string(call) + ": " + name + "=" + std::to_string(value) + " must be >= 0");
  }
  return static_cast<std::size_t>(value);
}

DeviceKind parse_kind(const std::string& kind) {
  if (kind == "cpu" || kind == "host") return DeviceKind::kHost;
  if (kind == "cuda") return DeviceKind::kCuda;
  throw py::value_error("device kind '" + kind + "' is not supported (use 'cpu' or 'cuda')");
}

py::dict arena_stats_dict(const ArenaStats& s) {
  py::dict d;
  d["granularity"] = s.granularity;
  d["reserved_bytes"] = s.reserved_bytes;
  d["mapped_bytes"] = s.mapped_bytes;
  d["pending_bytes"] = s.pending_bytes;
  d["cached_bytes"] = s.cached_bytes;
  d["held_bytes"] = s.held_bytes;
  d["reuse_bytes"] = s.reuse_bytes;
  d["maps"] = s.maps;
  d["unmaps"] = s.unmaps;
  d["creates"] = s.creates;
  d["releases"] = s.releases;
  d["reuses"] = s.reuses;
  d["revives"] = s.revives;
  return d;
}

void bind_arena(py::module_& m) {
  py::class_<Arena>(m, "Arena", "One reserved address range with granules mapped on demand (see arena.h).")
      .def(py::init([](std::int64_t capacity_bytes, const std::string& device_kind, int device_index,
                       std::int64_t reuse_bytes) {
             ArenaConfig cfg;
             cfg.capacity_bytes = non_negative("Arena", "capacity_bytes", capacity_bytes);
             cfg.kind = parse_kind(device_kind);
             cfg.device_index = device_index;
             cfg.reuse_bytes = reuse_bytes < 0 ? -1 : reuse_bytes;
             std::unique_ptr<Arena> arena;
             Status st;
             {
               py::gil_scoped_release nogil;
               st = Arena::create(cfg, &arena);
             }
             throw_if_error(st);
             return arena;
           }),
           py::arg("capacity_bytes"), py::arg("device_kind") = "cpu", py::arg("device_index") = 0,
           py::arg("reuse_bytes") = -1)
      .def(
          "map",
          [](Arena& a, std::int64_t offset, std::int64_t nbytes) {
            std::size_t o = non_negative("Arena.map", "offset", offset);
            std::size_t n = non_negative("Arena.map", "nbytes", nbytes);
            Status st;
            {
              py::gil_scoped_release nogil;
              st = a.map(o, n);
            }
            throw_if_error(st);
          },
          py::arg("offset"), py::arg("nbytes"))
      .def(
          "ensure_mapped",
          [](Arena& a, std::int64_t offset, std::int64_t nbytes) {
            std::size_t o = non_negative("Arena.ensure_mapped", "offset", offset);
            std::size_t n = non_negative("Arena.ensure_mapped", "nbytes", nbytes);
            std::size_t newly = 0;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = a.ensure_mapped(o, n, &newly);
            }
            throw_if_error(st);
            return newly;
          },
          py::arg("offset"), py::arg("nbytes"))
      .def(
          "unmap",
          [](Arena& a, std::int64_t offset, std::int64_t nbytes, const std::vector<std::uintptr_t>& streams) {
            std::size_t o = non_negative("Arena.unmap", "offset", offset);
            std::size_t n = non_negative("Arena.unmap", "nbytes", nbytes);
            std::vector<void*> on;
            for (std::uintptr_t s : streams) on.push_back(reinterpret_cast<void*>(s));
            if (on.empty()) on.push_back(nullptr);
            Status st;
            {
              py::gil_scoped_release nogil;
              st = a.unmap(o, n, on);
            }
            throw_if_error(st);
          },
          py::arg("offset"), py::arg("nbytes"), py::arg("streams") = std::vector<std::uintptr_t>{},
          "streams: CUstreams as ints (0 = default stream) on which release events are recorded, "
          "besides the registered ones (add_stream); empty = the default stream")
      .def(
          "add_stream",
          [](Arena& a, std::uintptr_t stream) { throw_if_error(a.add_stream(reinterpret_cast<void*>(stream))); },
          py::arg("stream"))
      .def(
          "remove_stream",
          [](Arena& a, std::uintptr_t stream) { throw_if_error(a.remove_stream(reinterpret_cast<void*>(stream))); },
          py::arg("stream"))
      .def_property_readonly("streams",
                             [](const Arena& a) {
                               std::vector<std::uintptr_t> out;
                               for (void* s : a.streams()) out.push_back(reinterpret_cast<std::uintptr_t>(s));
                               return out;
                             })
      .def(
          "is_mapped",
          [](const Arena& a, std::int64_t offset, std::int64_t nbytes) {
            bool out = false;
            throw_if_error(a.is_mapped(non_negative("Arena.is_mapped", "offset", offset),
                                       non_negative("Arena.is_mapped", "nbytes", nbytes), &out));
            return out;
          },
          py::arg("offset"), py::arg("nbytes"))
      .def(
          "trim",
          [](Arena& a, bool wait) {
            std::size_t released = 0;
            Status st;
            {
              py::gil_scoped_release nogil;
              st = a.trim(&released, wait);
            }
            throw_if_error(st);
            return released;
          },
          py::arg("wait") = false)
      .def("poll",
           [](Arena& a) {
             std::size_t finished = 0;
             Status st;
             {
               py::gil_scoped_release nogil;
               st = a.poll(&finished);
             }
             throw_if_error(st);
             return finished;
           })
      .def(
          "set_reuse_bytes",
          [](Arena& a, std::int64_t nbytes) {
            throw_if_error(a.set_reuse_bytes(non_negative("Arena.set_reuse_bytes", "nbytes", nbytes)));
          },
          py::arg("nbytes"))
      .def("stats",
           [](const Arena& a) {
             py::dict d = arena_stats_dict(a.stats());
             d["leaked_events"] = a.leaked_fences();
             return d;
           })
      .def("close",
           [](Arena& a) {
             Status st;
             {
               py::gil_scoped_release nogil;
               st = a.close();
             }
             throw_if_error(st);
           })
      .def_property_readonly("closed", &Arena::closed)
      .def_property_readonly("base_address", &Arena::base)
      .def_property_readonly("capacity", &Arena::capacity)
      .def_property_readonly("granularity", &Arena::granularity)
      .def_property_readonly("device_index", &Arena::device_index)
      .def_property_readonly("device_kind",
                             [](const Arena& a) { return a.kind() == DeviceKind::kHost ? "cpu" : "cuda"; })
      .def_property_readonly("backend_name", [](const Arena& a) { return a.caps().name; })
      .def_property_readonly("host_accessible", [](const Arena& a) { return a.caps().host_accessible; });
}

void bind_budget(py::module_& m) {
  m.def(
      "set_budget",
      [](std::optional<std::int64_t> nbytes, const std::string& device_kind, int device_index) {
        std::optional<std::size_t> limit;
        if (nbytes) limit = non_negative("set_budget", "nbytes", *nbytes);
        Status st;
        auto budget = Budget::for_device(parse_kind(device_kind), device_index);
        {
          py::gil_scoped_release nogil;
          st = budget->set_limit(limit);
        }
        throw_if_error(st);
      },
      py::arg("nbytes"), py::arg("device_kind") = "cpu", py::arg("device_index") = 0,
      "Set the byte budget every arena on the device draws from (None = unlimited).");
  m.def(
      "memory_stats",
      [](const std::string& device_kind, int device_index) {
        BudgetStats s = Budget::for_device(parse_kind(device_kind), device_index)->stats();
        py::dict d;
        d["budget_bytes"] = s.limit_bytes ? py::cast(*s.limit_bytes) : py::none();
        d["held_bytes"] = s.held_bytes;
        d["mapped_bytes"] = s.mapped_bytes;
        d["pending_bytes"] = s.pending_bytes;
        d["cached_bytes"] = s.cached_bytes;
        d["reserved_bytes"] = s.reserved_bytes;
        d["arenas"] = s.arenas;
        return d;
      },
      py::arg("device_kind") = "cpu", py::arg("device_index") = 0);
}

void bind_host_memory(py::module_& m) {
  m.def(
      "host_memory",
      []() {
        HostMemory h;
        throw_if_error(read_host_memory(&h));
        py::dict d;
        d["mem_total"] = h.mem_total;
        d["mem_available"] = h.mem_available;
        d["cgroup_limit"] = h.cgroup_limit ? py::cast(*h.cgroup_limit) : py::none();
        d["cgroup_usage"] = h.cgroup_usage;
        d["cgroup_path"] = h.cgroup_path;
        d["available"] = h.available();
        d["margin"] = h.margin();
        return d;
      },
      "What the host backend may still commit: MemAvailable capped by the memory cgroup's room "
      "(host_memory.h); a map that would leave less than `margin` free raises MemoryError.");
}

void bind_driver_probe(py::module_& m) {
  m.def(
      "probe_driver",
      [](int device_index, std::int64_t granules, std::int64_t handle_granules, std::int64_t reserve_repeats) {
        DriverProbeConfig cfg;
        cfg.device_index = device_index;
        cfg.granules = non_negative("probe_driver", "granules", granules);
        cfg.handle_granules = non_negative("probe_driver", "handle_granules", handle_granules);
        cfg.reserve_repeats = non_negative("probe_driver", "reserve_repeats", reserve_repeats);
        DriverProbeResult r;
        Status st;
        {
          py::gil_scoped_release nogil;
          st = probe_driver(cfg, &r);
        }
        throw_if_error(st);
        py::dict d;
        d["library"] = r.library;
        d["is_fake"] = r.is_fake;
        d["driver_version"] = r.driver_version;
        d["granularity"] = r.granularity;
        d["recommended_granularity"] = r.recommended_granularity;
        d["handle_bytes"] = r.handle_bytes;
        d["range_bytes"] = r.range_bytes;
        d["reserve_us"] = r.reserve_us;
        d["address_free_us"] = r.address_free_us;
        d["create_us"] = r.create_us;
        d["map_us"] = r.map_us;
        d["set_access_us"] = r.set_access_us;
        d["set_access_range_us"] = r.set_access_range_us;
        d["unmap_us"] = r.unmap_us;
        d["release_us"] = r.release_us;
        d["event_create_us"] = r.event_create_us;
        d["event_record_us"] = r.event_record_us;
        d["event_query_us"] = r.event_query_us;
        d["event_destroy_us"] = r.event_destroy_us;
        return d;
      },
      py::arg("device_index") = 0, py::arg("granules") = 64, py::arg("handle_granules") = 1,
      py::arg("reserve_repeats") = 8,
      "Time each driver VMM call per handle through the cuda backend's function table "
      "(see driver_probe.h); per-call microseconds as lists.");
}

}  // namespace

void bind_allocator(py::module_& m);        // allocator_bindings.cpp
void bind_paged_attention(py::module_& m);  // paged_attention_bindings.cpp
}  // namespace ekv

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_elastic_kv C++ core: arenas, backends, per-device budgets";
  ekv::bind_arena(m);
  ekv::bind_budget(m);
  ekv::bind_host_memory(m);
  ekv::bind_driver_probe(m);
  ekv::bind_allocator(m);
  ekv::bind_paged_attention(m);
}
