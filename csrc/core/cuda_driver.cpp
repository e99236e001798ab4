// cuda_driver.cpp — fills the CudaDriver function table from a dlopen'ed library.
#include "core/cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

namespace ekv {

std::string CudaDriver::error_text(const char* call, CUresult rc) const {
  const char* name = nullptr;
  if (GetErrorName == nullptr || GetErrorName(rc, &name) != CUDA_SUCCESS || name == nullptr) name = "CUDA error";
  return std::string(call) + " failed: " + name + " (" + std::to_string(rc) + ")";
}

namespace {

Status load_from(const std::string& path, std::unique_ptr<CudaDriver>* out) {
  void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    return Unavailable("cannot load the CUDA driver library '" + path + "': " + (why ? why : "unknown error") +
                       " (set EKV_LIBCUDA to its path, or use device='cpu')");
  }
  // Until the table is complete and cuInit succeeded, a failure unloads the library again
  // (a loaded driver is kept for the life of the process, a rejected one is not).
  struct Unload {
    void* lib;
    ~Unload() {
      if (lib != nullptr) ::dlclose(lib);
    }
  } unload{lib};
  auto drv = std::make_unique<CudaDriver>();
  drv->path = path;
#define EKV_LOAD_FIELD(field, symbol, type)                                                          \
  drv->field = reinterpret_cast<type>(::dlsym(lib, symbol));                                         \
  if (drv->field == nullptr) {                                                                       \
    return Unavailable("CUDA driver library '" + path + "' has no symbol " + symbol +                \
                       " (a driver with the virtual memory management API, CUDA 10.2+, is needed)"); \
  }
  EKV_CUDA_DRIVER_FUNCTIONS(EKV_LOAD_FIELD)
#undef EKV_LOAD_FIELD
  drv->is_fake = ::dlsym(lib, "ekvfake_reset") != nullptr;
  CUresult rc = drv->Init(0);
  if (rc != CUDA_SUCCESS) {
    std::string msg = drv->error_text("cuInit", rc) + " (library '" + path + "')";
    drv.reset();  // holds pointers into the library: gone before it is
    return Unavailable(msg);
  }
  unload.lib = nullptr;
  *out = std::move(drv);
  return Status::Ok();
}

}  // namespace

Status load_cuda_driver(const CudaDriver** out) {
  // Driver libraries are process-wide by nature; this cache only avoids re-resolving them.
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<CudaDriver>> loaded;
  const char* env = std::getenv("EKV_LIBCUDA");
  std::string path = (env != nullptr && env[0] != '\0') ? env : "libcuda.so.1";
  std::lock_guard<std::mutex> lock(mu);
  auto it = loaded.find(path);
  if (it == loaded.end()) {
    std::unique_ptr<CudaDriver> drv;
    EKV_RETURN_IF_ERROR(load_from(path, &drv));
    it = loaded.emplace(path, std::move(drv)).first;
  }
  *out = it->second.get();
  return Status::Ok();
}

}  // namespace ekv
