// cuda_driver.h — the slice of the CUDA driver API the core uses, declared here (no CUDA
// toolkit needed to build) and reached through a function table filled by dlopen at run time.
//
// The declarations follow the driver's C ABI (cuda.h, CUDA 10.2+): enum values, struct layouts
// and the exported symbol names (some carry a _v2 suffix because cuda.h #defines the plain
// name to it). tests/fake_cuda/ implements the same symbols over host memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/status.h"

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st* CUcontext;
typedef struct CUevent_st* CUevent;
typedef struct CUstream_st* CUstream;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_NOT_SUPPORTED = 801,
};

enum { CU_MEM_ALLOCATION_TYPE_PINNED = 0x1 };
enum { CU_MEM_HANDLE_TYPE_NONE = 0x0 };
enum { CU_MEM_LOCATION_TYPE_DEVICE = 0x1 };
enum { CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3 };
enum { CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1 };
enum { CU_EVENT_DISABLE_TIMING = 0x2 };

typedef struct CUmemLocation_st {
  int type;  // CUmemLocationType
  int id;
} CUmemLocation;

typedef struct CUmemAllocationProp_st {
  int type;                  // CUmemAllocationType
  int requestedHandleTypes;  // CUmemAllocationHandleType
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
} CUmemAllocationProp;

typedef struct CUmemAccessDesc_st {
  CUmemLocation location;
  int flags;  // CUmemAccess_flags
} CUmemAccessDesc;

}  // extern "C"

namespace ekv {

// One entry per driver symbol; X(field, symbol, signature).
#define EKV_CUDA_DRIVER_FUNCTIONS(X)                                                                             \
  X(Init, "cuInit", CUresult (*)(unsigned int))                                                                  \
  X(DriverGetVersion, "cuDriverGetVersion", CUresult (*)(int*))                                                  \
  X(DeviceGet, "cuDeviceGet", CUresult (*)(CUdevice*, int))                                                      \
  X(DeviceGetCount, "cuDeviceGetCount", CUresult (*)(int*))                                                      \
  X(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", CUresult (*)(CUcontext*, CUdevice))                      \
  X(DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", CUresult (*)(CUdevice))                             \
  X(CtxGetCurrent, "cuCtxGetCurrent", CUresult (*)(CUcontext*))                                                  \
  X(CtxSetCurrent, "cuCtxSetCurrent", CUresult (*)(CUcontext))                                                   \
  X(CtxSynchronize, "cuCtxSynchronize", CUresult (*)(void))                                                      \
  X(StreamSynchronize, "cuStreamSynchronize", CUresult (*)(CUstream))                                            \
  X(GetErrorName, "cuGetErrorName", CUresult (*)(CUresult, const char**))                                        \
  X(MemGetInfo, "cuMemGetInfo_v2", CUresult (*)(std::size_t*, std::size_t*))                                     \
  X(MemGetAllocationGranularity, "cuMemGetAllocationGranularity",                                                \
    CUresult (*)(std::size_t*, const CUmemAllocationProp*, int))                                                 \
  X(MemAddressReserve, "cuMemAddressReserve",                                                                    \
    CUresult (*)(CUdeviceptr*, std::size_t, std::size_t, CUdeviceptr, unsigned long long))                       \
  X(MemAddressFree, "cuMemAddressFree", CUresult (*)(CUdeviceptr, std::size_t))                                  \
  X(MemCreate, "cuMemCreate",                                                                                    \
    CUresult (*)(CUmemGenericAllocationHandle*, std::size_t, const CUmemAllocationProp*, unsigned long long))    \
  X(MemRelease, "cuMemRelease", CUresult (*)(CUmemGenericAllocationHandle))                                      \
  X(MemMap, "cuMemMap",                                                                                          \
    CUresult (*)(CUdeviceptr, std::size_t, std::size_t, CUmemGenericAllocationHandle, unsigned long long))       \
  X(MemUnmap, "cuMemUnmap", CUresult (*)(CUdeviceptr, std::size_t))                                              \
  X(MemSetAccess, "cuMemSetAccess", CUresult (*)(CUdeviceptr, std::size_t, const CUmemAccessDesc*, std::size_t)) \
  X(MemcpyDtoH, "cuMemcpyDtoH_v2", CUresult (*)(void*, CUdeviceptr, std::size_t))                                \
  X(MemcpyHtoD, "cuMemcpyHtoD_v2", CUresult (*)(CUdeviceptr, const void*, std::size_t))                          \
  X(EventCreate, "cuEventCreate", CUresult (*)(CUevent*, unsigned int))                                          \
  X(EventRecord, "cuEventRecord", CUresult (*)(CUevent, CUstream))                                               \
  X(EventQuery, "cuEventQuery", CUresult (*)(CUevent))                                                           \
  X(EventSynchronize, "cuEventSynchronize", CUresult (*)(CUevent))                                               \
  X(EventDestroy, "cuEventDestroy_v2", CUresult (*)(CUevent))

template <typename T>
using DriverFn = T;  // lets a pointer-to-function type be written before the field name

struct CudaDriver {
#define EKV_DECLARE_FIELD(field, symbol, type) DriverFn<type> field = nullptr;
  EKV_CUDA_DRIVER_FUNCTIONS(EKV_DECLARE_FIELD)
#undef EKV_DECLARE_FIELD
  std::string path;      // the library the table was loaded from
  bool is_fake = false;  // the library is tests/fake_cuda (its addresses are host memory)

  // "cuMemCreate(...) failed: CUDA_ERROR_OUT_OF_MEMORY (2)"
  std::string error_text(const char* call, CUresult rc) const;
};

// The table for $EKV_LIBCUDA (or libcuda.so.1 when unset), loaded and cuInit'ed once per
// library path and kept for the life of the process (a dlopen'ed driver is never unloaded).
Status load_cuda_driver(const CudaDriver** out);

}  // namespace ekv
