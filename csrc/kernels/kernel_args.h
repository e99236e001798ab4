// kernel_args.h — reading and describing the raw arguments of the CPU attention kernels.
#pragma once

#include <cstdint>
#include <string>

namespace ekv {
namespace kernel_args {

// Element i of an index array whose elements are int32 (bytes == 4) or int64 (bytes == 8).
inline std::int64_t index_at(const void* base, int bytes, std::int64_t i) {
  return bytes == 4 ? static_cast<const std::int32_t*>(base)[i] : static_cast<const std::int64_t*>(base)[i];
}

// A number in an error message.
inline std::string num(std::int64_t v) { return std::to_string(v); }

}  // namespace kernel_args
}  // namespace ekv
