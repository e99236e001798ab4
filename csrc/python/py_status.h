// py_status.h — the one place a core Status becomes a Python exception (bindings only).
//
// kInvalidArgument -> ValueError, kOutOfMemory -> MemoryError (the Python layer turns it into
// torch.OutOfMemoryError on CUDA), anything else -> RuntimeError, as docs/INTERFACES.md says.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>

#include "core/status.h"

namespace ekv {

inline void throw_if_error(const Status& st) {
  if (st.ok()) return;
  switch (st.code()) {
    case StatusCode::kInvalidArgument: throw pybind11::value_error(st.message());
    case StatusCode::kOutOfMemory:
      PyErr_SetString(PyExc_MemoryError, st.message().c_str());
      throw pybind11::error_already_set();
    default: throw std::runtime_error(st.message());
  }
}

}  // namespace ekv
