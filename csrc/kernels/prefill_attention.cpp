// prefill_attention.cpp — see prefill_attention.h.
#include "kernels/prefill_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <string>

#include "kernels/kernel_args.h"
#include "kernels/run_parallel.h"
#include "kernels/vec_math.h"

// The AVX-512 and AVX2 builds need GCC 12 or later (target("arch=x86-64-v4") and
// __builtin_cpu_supports("x86-64-v4")); other compilers build the portable code only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define EKV_PREFILL_CLONES 1
#define EKV_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EKV_PREFILL_CLONES 0
#define EKV_ALWAYS_INLINE inline
#endif

namespace ekv {
namespace {

using kernel_args::index_at;
using kernel_args::num;

constexpr std::int64_t kLanes = 16;  // keys per block: one 16-float vector of scores per row
constexpr std::int64_t kMaxRows = 8;
constexpr std::int64_t kMaxKeyBlocks = 2;

int levels_here(int* out) {
  int n = 0;
#if EKV_PREFILL_CLONES
  if (__builtin_cpu_supports("x86-64-v4")) out[n++] = 4;
  if (__builtin_cpu_supports("x86-64-v3")) out[n++] = 3;
#endif
  out[n++] = 1;
  return n;
}

Status check(const CausalPrefillArgs& a) {
  const std::string f = "causal_prefill_attention: ";
  if (a.queries < 0 || a.q_start < 0) {
    return InvalidArgument(f + "queries=" + num(a.queries) + ", q_start=" + num(a.q_start) + " must be >= 0");
  }
  if (a.heads <= 0 || a.kv_heads <= 0 || a.head_dim <= 0) {
    return InvalidArgument(f + "heads=" + num(a.heads) + ", kv_heads=" + num(a.kv_heads) +
                           ", head_dim=" + num(a.head_dim) + " must all be > 0");
  }
  if (a.heads % a.kv_heads != 0) {
    return InvalidArgument(f + "heads=" + num(a.heads) + " is not a multiple of kv_heads=" + num(a.kv_heads));
  }
  if (a.threads < 1) return InvalidArgument(f + "threads=" + num(a.threads) + " must be >= 1");
  int levels[3];
  const int n_levels = levels_here(levels);
  if (a.isa != 0 && std::find(levels, levels + n_levels, a.isa) == levels + n_levels) {
    return InvalidArgument(f + "isa=" + num(a.isa) + " cannot run here (0 = best, 1 = portable" +
                           (n_levels > 1 ? std::string(", ") + num(levels[0]) + " = the best here" : std::string()) +
                           ")");
  }
  const std::int64_t strides[] = {a.q_token_stride, a.q_head_stride,  a.out_token_stride, a.out_head_stride,
                                  a.k_page_stride,  a.k_token_stride, a.k_head_stride,    a.v_page_stride,
                                  a.v_token_stride, a.v_head_stride};
  for (std::int64_t s : strides) {
    if (s < 0) return InvalidArgument(f + "stride " + num(s) + " must be >= 0");
  }
  // Key positions are compared as int32 in the mask.
  if (a.q_start > std::numeric_limits<std::int32_t>::max() - a.queries) {
    return InvalidArgument(f + "q_start=" + num(a.q_start) + " + queries=" + num(a.queries) + " keys exceed 2^31 - 1");
  }
  if (a.queries == 0) return Status::Ok();
  if (!a.out || !a.query || !a.key || !a.value) return InvalidArgument(f + "a data pointer is null");
  if (a.page_table) {
    if (a.table_index_bytes != 4 && a.table_index_bytes != 8) {
      return InvalidArgument(f + "page table index size " + num(a.table_index_bytes) +
                             " bytes is not 4 (int32) or 8 (int64)");
    }
    if (a.page_tokens <= 0 || a.num_pages <= 0) {
      return InvalidArgument(f + "page_tokens=" + num(a.page_tokens) + ", num_pages=" + num(a.num_pages) +
                             " must be > 0 with a page table");
    }
    const std::int64_t keys = a.q_start + a.queries;
    const std::int64_t used = (keys + a.page_tokens - 1) / a.page_tokens;
    if (used > a.table_pages) {
      return InvalidArgument(f + num(keys) + " keys need " + num(used) + " pages of " + num(a.page_tokens) +
                             " tokens, the page table has " + num(a.table_pages));
    }
    for (std::int64_t i = 0; i < used; ++i) {
      const std::int64_t page = index_at(a.page_table, a.table_index_bytes, i);
      if (page < 0 || page >= a.num_pages) {
        return InvalidArgument(f + "page " + num(i) + " id " + num(page) + " is outside [0, " + num(a.num_pages) + ")");
      }
    }
  } else if (a.q_start != 0) {
    // Contiguous K/V are the chunk's own rows: keys before it exist only in pages.
    return InvalidArgument(f + "q_start=" + num(a.q_start) + " needs a page table (contiguous K/V start at 0)");
  }
  return Status::Ok();
}

// One kv head's K/V, packed for the inner loops: keys transposed in blocks of 16
// ([block][dim][16]) so that 16 keys' scores are one vector per query row, values as
// [key][dim]. Both are zero past the last key and past head_dim (dims rounded up to 16), so
// the loops never need a remainder.
void pack_head(const CausalPrefillArgs& a, std::int64_t g, std::int64_t keys, std::int64_t blocks, std::int64_t dp,
               float* kt, float* vp) {
  const std::int64_t d = a.head_dim;
  std::fill(kt, kt + blocks * kLanes * dp, 0.0f);
  std::fill(vp, vp + blocks * kLanes * dp, 0.0f);
  for (std::int64_t t = 0; t < keys; ++t) {
    const float* k;
    const float* v;
    if (a.page_table) {
      const std::int64_t page = index_at(a.page_table, a.table_index_bytes, t / a.page_tokens);
      const std::int64_t off = t % a.page_tokens;
      k = a.key + page * a.k_page_stride + off * a.k_token_stride + g * a.k_head_stride;
      v = a.value + page * a.v_page_stride + off * a.v_token_stride + g * a.v_head_stride;
    } else {
      k = a.key + t * a.k_token_stride + g * a.k_head_stride;
      v = a.value + t * a.v_token_stride + g * a.v_head_stride;
    }
    float* kcol = kt + (t / kLanes) * dp * kLanes + t % kLanes;
    for (std::int64_t x = 0; x < d; ++x) kcol[x * kLanes] = k[x];
    std::copy(v, v + d, vp + t * dp);
  }
}

struct Scratch {
  float* qs;  // [R][dp] the rows' queries times the scale
  float* o;   // [R][dp] the rows' unnormalised outputs
  float* p;   // [R][KB*16] one step's softmax weights
};

template <typename V>
EKV_ALWAYS_INLINE float lane_max(const V& v) {
  float m = v[0];
  for (int i = 1; i < vec::lanes_of<V>; ++i) m = std::max(m, v[i]);
  return m;
}

template <typename V>
EKV_ALWAYS_INLINE float lane_sum(const V& v) {
  float s = 0.0f;
  for (int i = 0; i < vec::lanes_of<V>; ++i) s += v[i];
  return s;
}

// o[r] = o[r] * alpha[r] + sum_j p[r][j] v[j] for RG rows at once over C vectors of dims.
template <typename V, int RG, int C>
EKV_ALWAYS_INLINE void accumulate_pv(float* o, const float* p, const float* alpha, const float* vrows, std::int64_t dp,
                                     std::int64_t pw, std::int64_t jn) {
  constexpr int W = vec::lanes_of<V>;
  V acc[RG][C];
  for (int r = 0; r < RG; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = vec::load<V>(o + r * dp + c * W) * alpha[r];
  }
  for (std::int64_t j = 0; j < jn; ++j) {
    V vv[C];
    for (int c = 0; c < C; ++c) vv[c] = vec::load<V>(vrows + j * dp + c * W);
    for (int r = 0; r < RG; ++r) {
      const float w = p[r * pw + j];
      for (int c = 0; c < C; ++c) acc[r][c] += w * vv[c];
    }
  }
  for (int r = 0; r < RG; ++r) {
    for (int c = 0; c < C; ++c) vec::store(o + r * dp + c * W, acc[r][c]);
  }
}

// Up to R query rows [i0, i0 + rows) of head h over their keys, KB blocks of 16 keys a step
// (each block NV vectors of V), the weighted values RG rows at a time.
template <typename V, int R, int KB, int RG>
EKV_ALWAYS_INLINE void attend_rows(const CausalPrefillArgs& a, const float* kt, const float* vp, std::int64_t dp,
                                   std::int64_t h, std::int64_t i0, std::int64_t rows, const Scratch& s) {
  using I = vec::int_vec_of<V>;
  constexpr int W = vec::lanes_of<V>;
  constexpr int NV = KB * kLanes / W;  // vectors of scores per row and step
  const std::int64_t d = a.head_dim;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (std::int64_t r = 0; r < R; ++r) {
    float* qr = s.qs + r * dp;
    std::fill(qr, qr + dp, 0.0f);
    std::fill(s.o + r * dp, s.o + (r + 1) * dp, 0.0f);
    if (r < rows) {
      const float* q = a.query + (i0 + r) * a.q_token_stride + h * a.q_head_stride;
      for (std::int64_t x = 0; x < d; ++x) qr[x] = q[x] * a.scale;
    }
  }
  float m[R], l[R], alpha[R];
  for (int r = 0; r < R; ++r) {
    m[r] = ninf;
    l[r] = 0.0f;
  }
  const std::int64_t first = a.q_start + i0;   // the first row's position: its last key
  const std::int64_t last = first + rows - 1;  // the last key any row sees
  const std::int64_t blocks = last / kLanes + 1;
  I iota;
  for (int i = 0; i < W; ++i) iota[i] = i;
  constexpr std::int64_t pw = KB * kLanes;
  for (std::int64_t b = 0; b < blocks; b += KB) {
    V sc[R][NV];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < NV; ++c) sc[r][c] = V{};
    }
    const float* kb = kt + b * dp * kLanes;
    for (std::int64_t x = 0; x < dp; ++x) {
      V kv[NV];
      for (int c = 0; c < NV; ++c) kv[c] = vec::load<V>(kb + ((c * W / kLanes) * dp + x) * kLanes + (c * W) % kLanes);
      for (int r = 0; r < R; ++r) {
        const float q = s.qs[r * dp + x];
        for (int c = 0; c < NV; ++c) sc[r][c] += q * kv[c];
      }
    }
    // Keys past a row's position (the diagonal, the padding) get weight exactly 0.
    const bool diagonal = (b + KB) * kLanes - 1 > first;
    for (int r = 0; r < R; ++r) {
      float* pr = s.p + r * pw;
      if (r >= rows) {
        std::fill(pr, pr + pw, 0.0f);
        alpha[r] = 0.0f;
        continue;
      }
      const std::int64_t limit = first + r;
      I keep[NV];
      float bm = ninf;
      for (int c = 0; c < NV; ++c) {
        if (diagonal) {
          keep[c] = (iota + static_cast<std::int32_t>(b * kLanes + c * W)) <= static_cast<std::int32_t>(limit);
          sc[r][c] = keep[c] ? sc[r][c] : ninf;
        }
        bm = std::max(bm, lane_max(sc[r][c]));
      }
      const float new_m = std::max(m[r], bm);  // finite: step 0 holds key 0 <= limit
      alpha[r] = vec::exp_nonpositive<float, std::int32_t>(m[r] - new_m);
      float sum = 0.0f;
      for (int c = 0; c < NV; ++c) {
        V w = vec::exp_nonpositive<V, I>(sc[r][c] - new_m);
        if (diagonal) w = keep[c] ? w : V{};
        vec::store(pr + c * W, w);
        sum += lane_sum(w);
      }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = new_m;
    }
    const std::int64_t jn = std::min<std::int64_t>(pw, last + 1 - b * kLanes);
    const float* vrows = vp + b * kLanes * dp;
    for (int r0 = 0; r0 < R; r0 += RG) {
      float* o = s.o + r0 * dp;
      const float* p = s.p + r0 * pw;
      std::int64_t c0 = 0;
      for (; c0 + 4 * W <= dp; c0 += 4 * W) accumulate_pv<V, RG, 4>(o + c0, p, alpha + r0, vrows + c0, dp, pw, jn);
      switch ((dp - c0) / W) {
        case 3: accumulate_pv<V, RG, 3>(o + c0, p, alpha + r0, vrows + c0, dp, pw, jn); break;
        case 2: accumulate_pv<V, RG, 2>(o + c0, p, alpha + r0, vrows + c0, dp, pw, jn); break;
        case 1: accumulate_pv<V, RG, 1>(o + c0, p, alpha + r0, vrows + c0, dp, pw, jn); break;
        default: break;
      }
    }
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    float* out = a.out + (i0 + r) * a.out_token_stride + h * a.out_head_stride;
    const float inv = 1.0f / l[r];
    for (std::int64_t x = 0; x < d; ++x) out[x] = s.o[r * dp + x] * inv;
  }
}

// One instruction set each: the template is inlined into each, so each is compiled for its
// own target, with the vector width its registers hold. Rows per block follow how many
// registers the target has for the scores (32 with AVX-512, 16 with AVX2 or SSE): 8 rows of
// two 16-key vectors, or 4 rows of one.
using RowsFn = void (*)(const CausalPrefillArgs&, const float*, const float*, std::int64_t, std::int64_t, std::int64_t,
                        std::int64_t, const Scratch&);
constexpr std::int64_t kRowsWide = 8, kRowsNarrow = 4;

void attend_portable(const CausalPrefillArgs& a, const float* kt, const float* vp, std::int64_t dp, std::int64_t h,
                     std::int64_t i0, std::int64_t rows, const Scratch& s) {
  attend_rows<vec::v4f, kRowsNarrow, 1, 2>(a, kt, vp, dp, h, i0, rows, s);
}

#if EKV_PREFILL_CLONES
__attribute__((target("arch=x86-64-v3"))) void attend_v3(const CausalPrefillArgs& a, const float* kt, const float* vp,
                                                         std::int64_t dp, std::int64_t h, std::int64_t i0,
                                                         std::int64_t rows, const Scratch& s) {
  attend_rows<vec::v8f, kRowsNarrow, 1, 2>(a, kt, vp, dp, h, i0, rows, s);
}

__attribute__((target("arch=x86-64-v4"))) void attend_v4(const CausalPrefillArgs& a, const float* kt, const float* vp,
                                                         std::int64_t dp, std::int64_t h, std::int64_t i0,
                                                         std::int64_t rows, const Scratch& s) {
  attend_rows<vec::v16f, kRowsWide, kMaxKeyBlocks, 4>(a, kt, vp, dp, h, i0, rows, s);
}
#endif

static_assert(kRowsWide <= kMaxRows && kRowsNarrow <= kMaxRows, "scratch is sized for kMaxRows");

}  // namespace

int prefill_isa_levels(int* levels, int capacity) {
  int all[3];
  const int n = levels_here(all);
  const int k = std::min(n, capacity);
  std::copy(all, all + k, levels);
  return k;
}

Status causal_prefill_attention(const CausalPrefillArgs& args) {
  Status st = check(args);
  if (!st.ok() || args.queries == 0) return st;
  const CausalPrefillArgs& a = args;
  int isa = a.isa;
  if (isa == 0) {
    int levels[3];
    levels_here(levels);
    isa = levels[0];
  }
  RowsFn fn = attend_portable;
  std::int64_t rows_per_item = kRowsNarrow;
#if EKV_PREFILL_CLONES
  if (isa == 4) {
    fn = attend_v4;
    rows_per_item = kRowsWide;
  } else if (isa == 3) {
    fn = attend_v3;
  }
#endif
  const std::int64_t keys = a.q_start + a.queries;
  // Blocks rounded up so a step of kMaxKeyBlocks blocks never reads past the packing.
  const std::int64_t blocks = (keys + kLanes * kMaxKeyBlocks - 1) / (kLanes * kMaxKeyBlocks) * kMaxKeyBlocks;
  const std::int64_t dp = (a.head_dim + kLanes - 1) / kLanes * kLanes;
  const std::int64_t head_floats = blocks * kLanes * dp;
  // K and V of a group of kv heads are packed at once (pack_head writes every float, padding
  // included), then all of the group's query heads run in one parallel pass. A group is as
  // many heads as fit in kPackBytes (at least one), so a long context costs memory for a few
  // heads, not all, and a short one runs every head in one pass.
  constexpr std::int64_t kPackBytes = std::int64_t{64} << 20;
  const std::int64_t head_bytes = 2 * head_floats * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t group = std::max<std::int64_t>(1, std::min(a.kv_heads, kPackBytes / head_bytes));
  std::unique_ptr<float[]> packed(new (std::nothrow) float[static_cast<std::size_t>(2 * head_floats * group)]);
  if (!packed) {
    return OutOfMemory("causal_prefill_attention: no memory to pack " + num(keys) + " keys of " + num(group) +
                       " kv heads of head_dim " + num(a.head_dim));
  }
  const std::int64_t n_rep = a.heads / a.kv_heads;
  const std::int64_t row_blocks = (a.queries + rows_per_item - 1) / rows_per_item;
  const std::int64_t scratch_floats = kMaxRows * (2 * dp + kMaxKeyBlocks * kLanes);
  std::unique_ptr<float[]> scratch(new (std::nothrow) float[static_cast<std::size_t>(
      scratch_floats * parallel_workers(group * n_rep * row_blocks, a.threads))]);
  if (!scratch) return OutOfMemory("causal_prefill_attention: no memory for the workers' scratch");
  for (std::int64_t g0 = 0; g0 < a.kv_heads; g0 += group) {
    const std::int64_t heads_here = std::min(group, a.kv_heads - g0);
    run_parallel(heads_here, a.threads, [&](int, std::int64_t j) {
      float* kt = packed.get() + 2 * j * head_floats;
      pack_head(a, g0 + j, keys, blocks, dp, kt, kt + head_floats);
    });
    const std::int64_t items = heads_here * n_rep * row_blocks;
    run_parallel(items, a.threads, [&](int w, std::int64_t i) {
      // The last row blocks see the most keys: hand them out first, so the workers end together.
      const std::int64_t rb = row_blocks - 1 - i / (heads_here * n_rep);
      const std::int64_t h = g0 * n_rep + i % (heads_here * n_rep);  // query head
      const float* kt = packed.get() + 2 * (h / n_rep - g0) * head_floats;
      float* buf = scratch.get() + w * scratch_floats;
      const Scratch s{buf, buf + kMaxRows * dp, buf + 2 * kMaxRows * dp};
      const std::int64_t i0 = rb * rows_per_item;
      fn(a, kt, kt + head_floats, dp, h, i0, std::min(rows_per_item, a.queries - i0), s);
    });
  }
  return Status::Ok();
}

}  // namespace ekv
