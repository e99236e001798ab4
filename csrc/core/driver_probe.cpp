// driver_probe.cpp — per-call timing of the driver VMM calls (see driver_probe.h).
//
// The sequence mirrors one arena grow and shrink, split into its driver calls so each can be
// timed alone: reserve a range, create every handle, map each, set access on each, unmap
// each, release each, free the range. Access is also set once over the whole range, to show
// what batching that call would save.
#include "core/driver_probe.h"

#include <chrono>
#include <limits>

#include "core/cuda_driver.h"

namespace ekv {
namespace {

using Clock = std::chrono::steady_clock;

double us_since(Clock::time_point t0) { return std::chrono::duration<double, std::micro>(Clock::now() - t0).count(); }

// What the probe holds at any moment; the destructor gives it all back, newest first, so an
// error anywhere leaves the device as it was found.
struct Held {
  explicit Held(const CudaDriver* d) : drv(d) {}
  ~Held() {
    for (CUevent e : events) drv->EventDestroy(e);
    for (std::size_t i = handles.size(); i-- > 0;) {
      if (mapped[i]) drv->MemUnmap(base + i * handle_bytes, handle_bytes);
      drv->MemRelease(handles[i]);
    }
    if (base != 0) drv->MemAddressFree(base, range_bytes);
    if (switched) drv->CtxSetCurrent(prev);
    if (retained) drv->DevicePrimaryCtxRelease(dev);
  }
  Held(const Held&) = delete;
  Held& operator=(const Held&) = delete;

  const CudaDriver* drv;
  CUdevice dev = 0;
  bool retained = false;
  CUcontext prev = nullptr;
  bool switched = false;
  CUdeviceptr base = 0;
  std::size_t range_bytes = 0;
  std::size_t handle_bytes = 0;
  std::vector<CUmemGenericAllocationHandle> handles;
  std::vector<bool> mapped;  // per handle
  std::vector<CUevent> events;
};

Status check_config(const DriverProbeConfig& c) {
  if (c.granules == 0 || c.handle_granules == 0 || c.reserve_repeats == 0) {
    return InvalidArgument("probe_driver: granules=" + std::to_string(c.granules) +
                           ", handle_granules=" + std::to_string(c.handle_granules) +
                           " and reserve_repeats=" + std::to_string(c.reserve_repeats) + " must all be >= 1");
  }
  if (c.device_index < 0) {
    return InvalidArgument("probe_driver: device_index=" + std::to_string(c.device_index) + " must be >= 0");
  }
  return Status::Ok();
}

}  // namespace

Status probe_driver(const DriverProbeConfig& config, DriverProbeResult* out) {
  EKV_RETURN_IF_ERROR(check_config(config));
  const CudaDriver* drv = nullptr;
  EKV_RETURN_IF_ERROR(load_cuda_driver(&drv));
  const std::string where = " on cuda:" + std::to_string(config.device_index);
  auto fail = [&](const std::string& call, CUresult rc) {
    std::string msg = "probe_driver: " + drv->error_text(call.c_str(), rc) + where;
    return rc == CUDA_ERROR_OUT_OF_MEMORY ? OutOfMemory(msg) : DriverError(msg);
  };

  int count = 0;
  CUresult rc = drv->DeviceGetCount(&count);
  if (rc != CUDA_SUCCESS) return fail("cuDeviceGetCount", rc);
  if (config.device_index >= count) {
    return InvalidArgument("probe_driver: cuda:" + std::to_string(config.device_index) +
                           " does not exist: the driver reports " + std::to_string(count) + " device(s)");
  }

  DriverProbeResult r;
  r.library = drv->path;
  r.is_fake = drv->is_fake;
  Held held(drv);
  if ((rc = drv->DeviceGet(&held.dev, config.device_index)) != CUDA_SUCCESS) return fail("cuDeviceGet", rc);
  CUcontext ctx = nullptr;
  if ((rc = drv->DevicePrimaryCtxRetain(&ctx, held.dev)) != CUDA_SUCCESS) return fail("cuDevicePrimaryCtxRetain", rc);
  held.retained = true;
  if ((rc = drv->CtxGetCurrent(&held.prev)) != CUDA_SUCCESS) return fail("cuCtxGetCurrent", rc);
  if (held.prev != ctx) {
    if ((rc = drv->CtxSetCurrent(ctx)) != CUDA_SUCCESS) return fail("cuCtxSetCurrent", rc);
    held.switched = true;
  }
  if ((rc = drv->DriverGetVersion(&r.driver_version)) != CUDA_SUCCESS) return fail("cuDriverGetVersion", rc);

  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = config.device_index;
  rc = drv->MemGetAllocationGranularity(&r.granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (rc != CUDA_SUCCESS || r.granularity == 0) return fail("cuMemGetAllocationGranularity(minimum)", rc);
  rc = drv->MemGetAllocationGranularity(&r.recommended_granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
  if (rc != CUDA_SUCCESS) return fail("cuMemGetAllocationGranularity(recommended)", rc);

  const std::size_t max = std::numeric_limits<std::size_t>::max();
  if (config.handle_granules > max / r.granularity ||
      config.granules > max / (r.granularity * config.handle_granules)) {
    return InvalidArgument("probe_driver: granules=" + std::to_string(config.granules) + " x handle_granules=" +
                           std::to_string(config.handle_granules) + " overflows the address space");
  }
  const std::size_t hb = r.granularity * config.handle_granules;
  const std::size_t n = config.granules;
  r.handle_bytes = hb;
  r.range_bytes = hb * n;
  held.handle_bytes = hb;
  held.range_bytes = r.range_bytes;

  // Reserve: repeats - 1 reserve/free pairs, then one reserve kept for the rest.
  for (std::size_t i = 0; i < config.reserve_repeats; ++i) {
    CUdeviceptr p = 0;
    auto t0 = Clock::now();
    rc = drv->MemAddressReserve(&p, r.range_bytes, r.granularity, 0, 0);
    r.reserve_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuMemAddressReserve(size=" + std::to_string(r.range_bytes) + ")", rc);
    if (i + 1 == config.reserve_repeats) {
      held.base = p;
      break;
    }
    t0 = Clock::now();
    rc = drv->MemAddressFree(p, r.range_bytes);
    r.address_free_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuMemAddressFree", rc);
  }

  held.handles.reserve(n);
  held.mapped.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    CUmemGenericAllocationHandle h = 0;
    auto t0 = Clock::now();
    rc = drv->MemCreate(&h, hb, &prop, 0);
    r.create_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) {
      return fail("cuMemCreate(size=" + std::to_string(hb) + ", handle " + std::to_string(i) + ")", rc);
    }
    held.handles.push_back(h);
    held.mapped.push_back(false);
  }

  auto map_each = [&](std::vector<double>* times) -> Status {
    for (std::size_t i = 0; i < n; ++i) {
      auto t0 = Clock::now();
      CUresult mrc = drv->MemMap(held.base + i * hb, hb, 0, held.handles[i], 0);
      if (times) times->push_back(us_since(t0));
      if (mrc != CUDA_SUCCESS) return fail("cuMemMap(handle " + std::to_string(i) + ")", mrc);
      held.mapped[i] = true;
    }
    return Status::Ok();
  };
  auto unmap_each = [&](std::vector<double>* times) -> Status {
    for (std::size_t i = 0; i < n; ++i) {
      auto t0 = Clock::now();
      CUresult urc = drv->MemUnmap(held.base + i * hb, hb);
      if (times) times->push_back(us_since(t0));
      if (urc != CUDA_SUCCESS) return fail("cuMemUnmap(handle " + std::to_string(i) + ")", urc);
      held.mapped[i] = false;
    }
    return Status::Ok();
  };

  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = config.device_index;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;

  EKV_RETURN_IF_ERROR(map_each(&r.map_us));
  for (std::size_t i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    rc = drv->MemSetAccess(held.base + i * hb, hb, &access, 1);
    r.set_access_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuMemSetAccess(handle " + std::to_string(i) + ")", rc);
  }
  EKV_RETURN_IF_ERROR(unmap_each(&r.unmap_us));

  // Access set once over the whole range (all handles mapped): the batched form of the call.
  EKV_RETURN_IF_ERROR(map_each(nullptr));
  auto t0 = Clock::now();
  rc = drv->MemSetAccess(held.base, r.range_bytes, &access, 1);
  r.set_access_range_us = us_since(t0);
  if (rc != CUDA_SUCCESS) return fail("cuMemSetAccess(whole range)", rc);
  EKV_RETURN_IF_ERROR(unmap_each(nullptr));

  while (!held.handles.empty()) {
    t0 = Clock::now();
    rc = drv->MemRelease(held.handles.back());
    r.release_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuMemRelease(handle " + std::to_string(held.handles.size() - 1) + ")", rc);
    held.handles.pop_back();
    held.mapped.pop_back();
  }

  t0 = Clock::now();
  rc = drv->MemAddressFree(held.base, r.range_bytes);
  r.address_free_us.push_back(us_since(t0));
  if (rc != CUDA_SUCCESS) return fail("cuMemAddressFree", rc);
  held.base = 0;

  // Events as the allocator and the arena use them (no timing, recorded on the null stream):
  // what one stream-ordered free or deferred unmap costs in driver calls.
  held.events.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    CUevent e = nullptr;
    t0 = Clock::now();
    rc = drv->EventCreate(&e, CU_EVENT_DISABLE_TIMING);
    r.event_create_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuEventCreate(event " + std::to_string(i) + ")", rc);
    held.events.push_back(e);
  }
  for (std::size_t i = 0; i < n; ++i) {
    t0 = Clock::now();
    rc = drv->EventRecord(held.events[i], nullptr);
    r.event_record_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuEventRecord(event " + std::to_string(i) + ")", rc);
  }
  if ((rc = drv->CtxSynchronize()) != CUDA_SUCCESS) return fail("cuCtxSynchronize", rc);
  for (std::size_t i = 0; i < n; ++i) {
    t0 = Clock::now();
    rc = drv->EventQuery(held.events[i]);
    r.event_query_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuEventQuery(event " + std::to_string(i) + ")", rc);
  }
  while (!held.events.empty()) {
    t0 = Clock::now();
    rc = drv->EventDestroy(held.events.back());
    r.event_destroy_us.push_back(us_since(t0));
    if (rc != CUDA_SUCCESS) return fail("cuEventDestroy(event " + std::to_string(held.events.size() - 1) + ")", rc);
    held.events.pop_back();
  }

  *out = std::move(r);
  return Status::Ok();
}

}  // namespace ekv
