// c_abi.cpp — the two functions torch.cuda.memory.CUDAPluggableAllocator loads.
//
//   void* ekv_malloc(size_t size, int device, cudaStream_t stream);
//   void  ekv_free(void* ptr, size_t size, int device, cudaStream_t stream);
//
// The stream is an opaque pointer (no CUDA headers). device == -1 selects the host backend, so
// the same ABI runs on machines without a GPU. Nothing crosses this line as an exception:
// failures return NULL (malloc) or change nothing (free), and leave a message for
// torch_elastic_kv.allocator.last_error(). They live in the _C module itself, so Python's
// trim/stats/pause see the very allocator torch calls.
#include <cstddef>

#include "alloc/allocator.h"

#define EKV_C_API extern "C" __attribute__((visibility("default")))

EKV_C_API void* ekv_malloc(std::size_t size, int device, void* stream) noexcept {
  try {
    return ekv::Allocator::instance().malloc(size, device, stream);
  } catch (...) {  // only the allocator's first construction could throw (out of memory)
    return nullptr;
  }
}

EKV_C_API void ekv_free(void* ptr, std::size_t size, int device, void* stream) noexcept {
  try {
    ekv::Allocator::instance().free(ptr, size, device, stream);
  } catch (...) {
  }
}
