// driver_probe.h — times the raw driver VMM calls, granule by granule, through the same
// function table the cuda backend uses (cuda_driver.h).
//
// What the arena's figures cannot show on their own: how much of a grow is cuMemCreate and how
// much is cuMemMap / cuMemSetAccess, and what an unmap and a release cost once the device is
// done. benchmarks/gpu_check.py reports these against public A100 figures. On the fake driver
// ($EKV_LIBCUDA) the same code runs over host memory, so the probe itself is tested in CI.
//
// The probe owns everything it creates and gives all of it back before returning, on success
// and on every error path; it works in the device's primary context and restores the caller's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace ekv {

struct DriverProbeConfig {
  int device_index = 0;
  std::size_t granules = 64;        // handles created, mapped, ... one call each
  std::size_t handle_granules = 1;  // granules per handle (1 = the minimum granularity)
  std::size_t reserve_repeats = 8;  // cuMemAddressReserve/cuMemAddressFree pairs timed
};

// Per-call wall times in microseconds, one entry per call, in call order.
struct DriverProbeResult {
  std::string library;  // the driver library the table came from
  bool is_fake = false;
  int driver_version = 0;
  std::size_t granularity = 0;  // minimum granularity (what the backend uses)
  std::size_t recommended_granularity = 0;
  std::size_t handle_bytes = 0;    // bytes per handle timed below
  std::size_t range_bytes = 0;     // bytes of the reserved range (granules * handle_bytes)
  std::vector<double> reserve_us;  // cuMemAddressReserve of range_bytes
  std::vector<double> address_free_us;
  std::vector<double> create_us;         // cuMemCreate of handle_bytes
  std::vector<double> map_us;            // cuMemMap of one handle
  std::vector<double> set_access_us;     // cuMemSetAccess of one handle's range
  double set_access_range_us = 0;        // one cuMemSetAccess over the whole mapped range
  std::vector<double> unmap_us;          // cuMemUnmap of one handle's range
  std::vector<double> release_us;        // cuMemRelease of one handle
  std::vector<double> event_create_us;   // cuEventCreate(CU_EVENT_DISABLE_TIMING), one per handle
  std::vector<double> event_record_us;   // cuEventRecord on the null stream
  std::vector<double> event_query_us;    // cuEventQuery of a completed event
  std::vector<double> event_destroy_us;  // cuEventDestroy
};

// Runs the probe; on error nothing it created is left behind and the Status names the call.
Status probe_driver(const DriverProbeConfig& config, DriverProbeResult* out);

}  // namespace ekv
