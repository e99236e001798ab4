// cuda_backend.cpp — granules of device memory through the driver VMM API.
//
// Works in the device's primary context (the one torch's runtime uses), made current for the
// duration of each call and restored after, so the caller's context is never disturbed.
// Unmapping is deferred by the Arena until an event recorded at unmap time has completed:
// the device may still be reading the granule, and waiting on that event (not on the whole
// device) is the cheapest correct wait.
#include <atomic>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/cuda_driver.h"

namespace ekv {
namespace {

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CudaDriver* drv, CUdevice dev, CUcontext ctx, int index, std::size_t granularity)
      : drv_(drv), dev_(dev), ctx_(ctx), index_(index) {
    caps_.granularity = granularity;
    caps_.deferred_unmap = true;
    caps_.host_accessible = drv->is_fake;
    caps_.name = drv->is_fake ? "cuda(fake)" : "cuda";
  }
  ~CudaBackend() override { drv_->DevicePrimaryCtxRelease(dev_); }

  const BackendCaps& caps() const override { return caps_; }

  // Sets caps().granularity from the driver's minimum granularity for pinned device memory
  // (the alignment every reserve/map must honour); called once, right after construction.
  Status query_granularity(std::size_t* out) {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUmemAllocationProp prop = alloc_prop(index_);
    std::size_t gran = 0;
    CUresult rc = drv_->MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    if (rc != CUDA_SUCCESS || gran == 0) {
      return Unavailable(drv_->error_text("cuMemGetAllocationGranularity", rc) + " on cuda:" + std::to_string(index_));
    }
    caps_.granularity = gran;
    *out = gran;
    return Status::Ok();
  }

  Status reserve(std::size_t nbytes, std::uintptr_t* addr) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUdeviceptr p = 0;
    CUresult rc = drv_->MemAddressReserve(&p, nbytes, caps_.granularity, 0, 0);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemAddressReserve(size=" + std::to_string(nbytes) + ")", rc);
    *addr = static_cast<std::uintptr_t>(p);
    return Status::Ok();
  }

  Status free_range(std::uintptr_t addr, std::size_t nbytes) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->MemAddressFree(static_cast<CUdeviceptr>(addr), nbytes);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemAddressFree", rc);
    return Status::Ok();
  }

  Status create(std::size_t nbytes, PhysHandle* out) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUmemAllocationProp prop = alloc_prop(index_);
    CUmemGenericAllocationHandle h = 0;
    CUresult rc = drv_->MemCreate(&h, nbytes, &prop, 0);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemCreate(size=" + std::to_string(nbytes) + ")", rc);
    *out = static_cast<PhysHandle>(h);
    return Status::Ok();
  }

  Status map(std::uintptr_t addr, std::size_t nbytes, PhysHandle handle) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUdeviceptr p = static_cast<CUdeviceptr>(addr);
    CUresult rc = drv_->MemMap(p, nbytes, 0, static_cast<CUmemGenericAllocationHandle>(handle), 0);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemMap", rc);
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = index_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    rc = drv_->MemSetAccess(p, nbytes, &access, 1);
    if (rc != CUDA_SUCCESS) {
      drv_->MemUnmap(p, nbytes);  // all or nothing: no mapping without access survives
      return from_cu("cuMemSetAccess", rc);
    }
    return Status::Ok();
  }

  // cuMemMap each granule, then one cuMemSetAccess over the run: the driver accepts a range
  // that spans several mappings as long as every byte of it is mapped.
  Status map_range(std::uintptr_t addr, const PhysHandle* handles, std::size_t count) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    const std::size_t g = caps_.granularity;
    auto undo = [&](std::size_t mapped) {
      // Best effort, one granule at a time (each unmap covers exactly one earlier map).
      for (std::size_t j = mapped; j > 0; --j) drv_->MemUnmap(static_cast<CUdeviceptr>(addr + (j - 1) * g), g);
    };
    for (std::size_t k = 0; k < count; ++k) {
      CUresult rc = drv_->MemMap(static_cast<CUdeviceptr>(addr + k * g), g, 0,
                                 static_cast<CUmemGenericAllocationHandle>(handles[k]), 0);
      if (rc != CUDA_SUCCESS) {
        undo(k);
        return from_cu("cuMemMap", rc);
      }
    }
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = index_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CUresult rc = drv_->MemSetAccess(static_cast<CUdeviceptr>(addr), count * g, &access, 1);
    if (rc != CUDA_SUCCESS) {
      undo(count);  // all or nothing: no mapping without access survives
      return from_cu("cuMemSetAccess(size=" + std::to_string(count * g) + ")", rc);
    }
    return Status::Ok();
  }

  Status unmap(std::uintptr_t addr, std::size_t nbytes) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->MemUnmap(static_cast<CUdeviceptr>(addr), nbytes);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemUnmap", rc);
    return Status::Ok();
  }

  Status release(PhysHandle handle, std::size_t nbytes) override {
    (void)nbytes;
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->MemRelease(static_cast<CUmemGenericAllocationHandle>(handle));
    if (rc != CUDA_SUCCESS) return from_cu("cuMemRelease", rc);
    return Status::Ok();
  }

  Status record_fence(void* stream, Fence* out) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUevent ev = nullptr;
    CUresult rc = drv_->EventCreate(&ev, CU_EVENT_DISABLE_TIMING);
    if (rc != CUDA_SUCCESS) return from_cu("cuEventCreate", rc);
    rc = drv_->EventRecord(ev, static_cast<CUstream>(stream));
    if (rc != CUDA_SUCCESS) {
      CUresult drc = drv_->EventDestroy(ev);
      if (drc != CUDA_SUCCESS) note_leak(from_cu("cuEventDestroy", drc).message());
      return from_cu("cuEventRecord", rc);
    }
    *out = static_cast<Fence>(ev);
    return Status::Ok();
  }

  Status fence_done(Fence fence, bool* done) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->EventQuery(static_cast<CUevent>(fence));
    if (rc == CUDA_SUCCESS) {
      *done = true;
    } else if (rc == CUDA_ERROR_NOT_READY) {
      *done = false;
    } else {
      return from_cu("cuEventQuery", rc);
    }
    return Status::Ok();
  }

  Status fence_wait(Fence fence) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->EventSynchronize(static_cast<CUevent>(fence));
    if (rc != CUDA_SUCCESS) return from_cu("cuEventSynchronize", rc);
    return Status::Ok();
  }

  void destroy_fence(Fence fence) override {
    CtxScope scope(this);
    if (!scope.status.ok()) {
      note_leak(scope.status.message());
      return;
    }
    CUresult rc = drv_->EventDestroy(static_cast<CUevent>(fence));
    if (rc != CUDA_SUCCESS) note_leak(from_cu("cuEventDestroy", rc).message());
  }

  std::uint64_t leaked_fences() const override { return leaked_fences_.load(std::memory_order_relaxed); }

  std::string last_leak() const override {
    std::lock_guard<std::mutex> lock(leak_mu_);
    return last_leak_;
  }

  Status synchronize() override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->CtxSynchronize();
    if (rc != CUDA_SUCCESS) return from_cu("cuCtxSynchronize", rc);
    return Status::Ok();
  }

  Status synchronize_stream(void* stream) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->StreamSynchronize(static_cast<CUstream>(stream));
    if (rc != CUDA_SUCCESS) return from_cu("cuStreamSynchronize", rc);
    return Status::Ok();
  }

  Status copy_to_host(void* dst, std::uintptr_t src, std::size_t nbytes) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->MemcpyDtoH(dst, static_cast<CUdeviceptr>(src), nbytes);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemcpyDtoH", rc);
    return Status::Ok();
  }

  Status copy_from_host(std::uintptr_t dst, const void* src, std::size_t nbytes) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->MemcpyHtoD(static_cast<CUdeviceptr>(dst), src, nbytes);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemcpyHtoD", rc);
    return Status::Ok();
  }

  Status device_memory(std::size_t* free_bytes, std::size_t* total_bytes) override {
    CtxScope scope(this);
    EKV_RETURN_IF_ERROR(scope.status);
    CUresult rc = drv_->MemGetInfo(free_bytes, total_bytes);
    if (rc != CUDA_SUCCESS) return from_cu("cuMemGetInfo", rc);
    return Status::Ok();
  }

 private:
  // Makes the primary context current for one call and puts the caller's back after.
  struct CtxScope {
    explicit CtxScope(CudaBackend* b) : drv(b->drv_) {
      CUresult rc = drv->CtxGetCurrent(&prev);
      if (rc != CUDA_SUCCESS) {
        status = b->from_cu("cuCtxGetCurrent", rc);
        return;
      }
      if (prev != b->ctx_) {
        rc = drv->CtxSetCurrent(b->ctx_);
        if (rc != CUDA_SUCCESS) {
          status = b->from_cu("cuCtxSetCurrent", rc);
          return;
        }
        switched = true;
      }
    }
    ~CtxScope() {
      if (switched) drv->CtxSetCurrent(prev);
    }
    const CudaDriver* drv;
    CUcontext prev = nullptr;
    bool switched = false;
    Status status;
  };

  static CUmemAllocationProp alloc_prop(int index) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = index;
    return prop;
  }

  void note_leak(const std::string& why) {
    std::lock_guard<std::mutex> lock(leak_mu_);
    last_leak_ = why + " (the event leaked)";
    leaked_fences_.fetch_add(1, std::memory_order_relaxed);
  }

  Status from_cu(const std::string& call, CUresult rc) const {
    std::string msg = drv_->error_text(call.c_str(), rc) + " on cuda:" + std::to_string(index_);
    if (rc == CUDA_ERROR_OUT_OF_MEMORY) return OutOfMemory(msg);
    if (rc == CUDA_ERROR_INVALID_VALUE) return InvalidArgument(msg);
    return DriverError(msg);
  }

  friend struct CtxScope;
  const CudaDriver* drv_;
  CUdevice dev_;
  CUcontext ctx_;
  int index_;
  BackendCaps caps_;
  std::atomic<std::uint64_t> leaked_fences_{0};
  mutable std::mutex leak_mu_;
  std::string last_leak_;
};

}  // namespace

Status make_cuda_backend(int device_index, std::unique_ptr<Backend>* out) {
  const CudaDriver* drv = nullptr;
  EKV_RETURN_IF_ERROR(load_cuda_driver(&drv));
  int count = 0;
  CUresult rc = drv->DeviceGetCount(&count);
  if (rc != CUDA_SUCCESS) return Unavailable(drv->error_text("cuDeviceGetCount", rc));
  if (device_index < 0 || device_index >= count) {
    return InvalidArgument("cuda:" + std::to_string(device_index) + " does not exist: the driver reports " +
                           std::to_string(count) + " device(s)");
  }
  CUdevice dev = 0;
  rc = drv->DeviceGet(&dev, device_index);
  if (rc != CUDA_SUCCESS) return Unavailable(drv->error_text("cuDeviceGet", rc));
  CUcontext ctx = nullptr;
  rc = drv->DevicePrimaryCtxRetain(&ctx, dev);
  if (rc != CUDA_SUCCESS) return Unavailable(drv->error_text("cuDevicePrimaryCtxRetain", rc));
  // From here the retained context is owned by the backend, whose destructor releases it; the
  // granularity is queried through it, so in the primary context like every later call.
  std::unique_ptr<CudaBackend> backend;
  try {
    backend = std::make_unique<CudaBackend>(drv, dev, ctx, device_index, 0);
  } catch (...) {
    drv->DevicePrimaryCtxRelease(dev);
    return OutOfMemory("cuda backend for cuda:" + std::to_string(device_index) + ": out of host memory");
  }
  std::size_t gran = 0;
  EKV_RETURN_IF_ERROR(backend->query_granularity(&gran));
  *out = std::move(backend);
  return Status::Ok();
}

}  // namespace ekv
