// status.h — the error value every core call returns.
//
// The core never throws across its public surface and never exits: each call returns a
// Status that names what failed and with which numbers. The bindings turn it into a Python
// exception; the C ABI (allocator) turns it into a null pointer.
#pragma once

#include <string>
#include <utility>

namespace ekv {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // caller passed a bad offset/size/state: nothing was changed
  kOutOfMemory,      // budget or driver could not supply the bytes: nothing was changed
  kDriverError,      // the memory primitive itself failed (mmap, cuMem*, ...)
  kUnavailable,      // backend cannot be used here (no libcuda, no device)
};

// [[nodiscard]]: a dropped Status is a dropped error. Where dropping one is right, say so with
// IgnoreError() and a comment saying why.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  void IgnoreError() const {}

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return Status(StatusCode::kInvalidArgument, std::move(m)); }
inline Status OutOfMemory(std::string m) { return Status(StatusCode::kOutOfMemory, std::move(m)); }
inline Status DriverError(std::string m) { return Status(StatusCode::kDriverError, std::move(m)); }
inline Status Unavailable(std::string m) { return Status(StatusCode::kUnavailable, std::move(m)); }

}  // namespace ekv

// Propagate a non-ok Status to the caller.
#define EKV_RETURN_IF_ERROR(expr)      \
  do {                                 \
    ::ekv::Status _ekv_st = (expr);    \
    if (!_ekv_st.ok()) return _ekv_st; \
  } while (0)
