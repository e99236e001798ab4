// vec_math.h — float vectors and a branch-free exp shared by the CPU attention kernels.
//
// Vectors are GCC/clang vector extensions, so one source serves every instruction set a
// kernel is cloned for. A kernel picks the width its target holds in one register (16 floats
// with AVX-512, 8 with AVX2, 4 with SSE or NEON): a wider one is split by the compiler, and
// in long loops that split goes through memory. Loads and stores go
// through memcpy (no alignment assumed). The helpers are inlined into their caller's clone, so
// the note GCC gives on passing wide vectors without AVX (-Wpsabi) is about an ABI no call
// here uses.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ekv {
namespace vec {

using v4f = float __attribute__((vector_size(16)));
using v4i = std::int32_t __attribute__((vector_size(16)));
using v8f = float __attribute__((vector_size(32)));
using v8i = std::int32_t __attribute__((vector_size(32)));
using v16f = float __attribute__((vector_size(64)));
using v16i = std::int32_t __attribute__((vector_size(64)));

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Lanes of a float vector type, and the integer vector its comparisons give.
template <typename V>
constexpr int lanes_of = static_cast<int>(sizeof(V) / sizeof(float));
template <typename V>
using int_vec_of = decltype(V{} < V{});

inline v8f load8(const float* p) { return load<v8f>(p); }
inline void store8(float* p, const v8f& v) { store(p, v); }

inline float lane_sum(const v8f& v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp(x) for x <= 0 (scores minus their running maximum), branch-free so that a vector of
// them runs as one: x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial (relative error below 2e-7, about one float32 ulp), 2^k built in the exponent
// bits; k is rounded by adding and subtracting 1.5 * 2^23. Inputs below -87 give exp(-87),
// about 1.6e-38 (expf gives a denormal there): a weight negligible beside the maximum's 1,
// but not 0, so a kernel that needs exact zeros (a causal mask) sets them itself. The same
// template serves one float and a vector, so both give the same bits.
template <typename F, typename I>
inline F exp_nonpositive(const F& in) {
  const F lo = F{} - 87.0f;  // -87 in every lane
  const F x = in < lo ? lo : in;
  const F k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const F r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 split: exact first part
  F p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<F, float>) {
    bits = (static_cast<I>(k) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(k, I) + 127) << 23;
  }
  F scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace vec
}  // namespace ekv
