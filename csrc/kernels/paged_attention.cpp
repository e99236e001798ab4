// paged_attention.cpp — see paged_attention.h.
#include "kernels/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>

#include "kernels/kernel_args.h"
#include "kernels/run_parallel.h"
#include "kernels/vec_math.h"

namespace ekv {
namespace {

using kernel_args::index_at;
using kernel_args::num;

using vec::exp_nonpositive;
using vec::lane_sum;
using vec::load8;
using vec::store8;
using vec::v8f;
using vec::v8i;

Status check(const PagedDecodeArgs& a) {
  const char* f = "paged_decode_attention: ";
  if (a.rows < 0) return InvalidArgument(std::string(f) + "rows=" + num(a.rows) + " must be >= 0");
  if (a.heads <= 0 || a.kv_heads <= 0 || a.head_dim <= 0 || a.page_tokens <= 0) {
    return InvalidArgument(std::string(f) + "heads=" + num(a.heads) + ", kv_heads=" + num(a.kv_heads) + ", head_dim=" +
                           num(a.head_dim) + ", page_tokens=" + num(a.page_tokens) + " must all be > 0");
  }
  if (a.heads % a.kv_heads != 0) {
    return InvalidArgument(std::string(f) + "heads=" + num(a.heads) +
                           " is not a multiple of kv_heads=" + num(a.kv_heads));
  }
  if (a.table_index_bytes != 4 && a.table_index_bytes != 8) {
    return InvalidArgument(std::string(f) + "page table index size " + num(a.table_index_bytes) +
                           " bytes is not 4 (int32) or 8 (int64)");
  }
  if (a.lens_index_bytes != 4 && a.lens_index_bytes != 8) {
    return InvalidArgument(std::string(f) + "context length size " + num(a.lens_index_bytes) +
                           " bytes is not 4 (int32) or 8 (int64)");
  }
  if (a.threads < 1) return InvalidArgument(std::string(f) + "threads=" + num(a.threads) + " must be >= 1");
  const std::int64_t strides[] = {a.q_token_stride, a.q_head_stride,  a.out_token_stride, a.out_head_stride,
                                  a.k_page_stride,  a.k_token_stride, a.k_head_stride,    a.v_page_stride,
                                  a.v_token_stride, a.v_head_stride,  a.table_row_stride};
  for (std::int64_t s : strides) {
    if (s < 0) return InvalidArgument(std::string(f) + "stride " + num(s) + " must be >= 0");
  }
  if (a.rows == 0) return Status::Ok();
  if (!a.out || !a.query || !a.key_cache || !a.value_cache || !a.page_table || !a.context_lens) {
    return InvalidArgument(std::string(f) + "a data pointer is null");
  }
  if (a.num_pages <= 0 || a.max_pages <= 0) {
    return InvalidArgument(std::string(f) + "num_pages=" + num(a.num_pages) + ", max_pages=" + num(a.max_pages) +
                           " must be > 0");
  }
  const std::int64_t tokens_bound = a.row_tokens ? a.num_tokens : a.rows;
  if (!a.row_tokens && a.num_tokens < a.rows) {
    return InvalidArgument(std::string(f) + "rows=" + num(a.rows) + " exceed num_tokens=" + num(a.num_tokens));
  }
  for (std::int64_t r = 0; r < a.rows; ++r) {
    if (a.row_tokens && (a.row_tokens[r] < 0 || a.row_tokens[r] >= tokens_bound)) {
      return InvalidArgument(std::string(f) + "row " + num(r) + " token " + num(a.row_tokens[r]) + " is outside [0, " +
                             num(tokens_bound) + ")");
    }
    const std::int64_t len = index_at(a.context_lens, a.lens_index_bytes, r);
    if (len < 1 || len > a.max_pages * a.page_tokens) {
      return InvalidArgument(std::string(f) + "row " + num(r) + " context length " + num(len) + " is outside [1, " +
                             num(a.max_pages * a.page_tokens) + "] (max_pages=" + num(a.max_pages) +
                             " x page_tokens=" + num(a.page_tokens) + ")");
    }
    const std::int64_t used = (len + a.page_tokens - 1) / a.page_tokens;
    const char* row = static_cast<const char*>(a.page_table) + r * a.table_row_stride * a.table_index_bytes;
    for (std::int64_t i = 0; i < used; ++i) {
      const std::int64_t page = index_at(row, a.table_index_bytes, i);
      if (page < 0 || page >= a.num_pages) {
        return InvalidArgument(std::string(f) + "row " + num(r) + " page " + num(i) + " id " + num(page) +
                               " is outside [0, " + num(a.num_pages) + ")");
      }
    }
  }
  return Status::Ok();
}

// One (row, kv head) item: the kv head's group of query heads over the row's pages.
// Per page: scores of its tokens, one rescale of the running sums to the new maximum, the
// tokens' weights in one pass, then the weighted V in blocks of 8 dims held in registers
// across the page's tokens. scratch holds n_rep * (page_tokens + head_dim) floats.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void attend_item(const PagedDecodeArgs& a, std::int64_t r, std::int64_t g, float* scratch) {
  const std::int64_t n_rep = a.heads / a.kv_heads;
  const std::int64_t d = a.head_dim;
  const std::int64_t pt = a.page_tokens;
  const std::int64_t token = a.row_tokens ? a.row_tokens[r] : r;
  const std::int64_t len = index_at(a.context_lens, a.lens_index_bytes, r);
  const char* table_row = static_cast<const char*>(a.page_table) + r * a.table_row_stride * a.table_index_bytes;
  float* scores = scratch;            // [n_rep, pt]
  float* acc = scratch + n_rep * pt;  // [n_rep, d]
  float m[16], l[16];                 // n_rep <= 16 here; larger groups are split by the caller
  std::fill(acc, acc + n_rep * d, 0.0f);
  for (std::int64_t j = 0; j < n_rep; ++j) {
    m[j] = -std::numeric_limits<float>::infinity();
    l[j] = 0.0f;
  }
  const float* q0 = a.query + token * a.q_token_stride + g * n_rep * a.q_head_stride;
  const std::int64_t used = (len + pt - 1) / pt;
  const std::int64_t d8 = d - d % 8;
  for (std::int64_t pi = 0; pi < used; ++pi) {
    const std::int64_t page = index_at(table_row, a.table_index_bytes, pi);
    const std::int64_t n = std::min(pt, len - pi * pt);
    const float* kp = a.key_cache + page * a.k_page_stride + g * a.k_head_stride;
    const float* vp = a.value_cache + page * a.v_page_stride + g * a.v_head_stride;
    for (std::int64_t j = 0; j < n_rep; ++j) {
      const float* q = q0 + j * a.q_head_stride;
      float* sj = scores + j * pt;
      float bm = -std::numeric_limits<float>::infinity();
      // Four tokens at a time: four independent chains of FMAs keep the FPU busy where one
      // token's chain would wait on each add. Each token's sum is formed the same way.
      std::int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        const float* k = kp + t * a.k_token_stride;
        const std::int64_t ks = a.k_token_stride;
        v8f p0 = {}, p1 = {}, p2 = {}, p3 = {};
        for (std::int64_t x = 0; x < d8; x += 8) {
          const v8f qx = load8(q + x);
          p0 += qx * load8(k + x);
          p1 += qx * load8(k + ks + x);
          p2 += qx * load8(k + 2 * ks + x);
          p3 += qx * load8(k + 3 * ks + x);
        }
        float s4[4] = {lane_sum(p0), lane_sum(p1), lane_sum(p2), lane_sum(p3)};
        for (int u = 0; u < 4; ++u) {
          for (std::int64_t x = d8; x < d; ++x) s4[u] += q[x] * k[u * ks + x];
          sj[t + u] = s4[u] * a.scale;
          bm = std::max(bm, sj[t + u]);
        }
      }
      for (; t < n; ++t) {
        const float* k = kp + t * a.k_token_stride;
        v8f part = {};
        for (std::int64_t x = 0; x < d8; x += 8) part += load8(q + x) * load8(k + x);
        float sc = lane_sum(part);
        for (std::int64_t x = d8; x < d; ++x) sc += q[x] * k[x];
        sj[t] = sc * a.scale;
        bm = std::max(bm, sj[t]);
      }
      const float new_m = std::max(m[j], bm);
      // 0 on the first page (m = -inf): the empty sums stay 0
      const float alpha = exp_nonpositive<float, std::int32_t>(m[j] - new_m);
      float* acc_j = acc + j * d;
      float sum = 0.0f;
      for (t = 0; t + 8 <= n; t += 8) {
        const v8f w = exp_nonpositive<v8f, v8i>(load8(sj + t) - new_m);
        store8(sj + t, w);
        sum += lane_sum(w);
      }
      for (; t < n; ++t) {
        sj[t] = exp_nonpositive<float, std::int32_t>(sj[t] - new_m);
        sum += sj[t];
      }
      // Blocks of acc stay in registers across the page's tokens, four blocks at a time (four
      // independent chains, as above).
      std::int64_t x = 0;
      for (; x + 32 <= d8; x += 32) {
        v8f b0 = load8(acc_j + x) * alpha, b1 = load8(acc_j + x + 8) * alpha;
        v8f b2 = load8(acc_j + x + 16) * alpha, b3 = load8(acc_j + x + 24) * alpha;
        for (std::int64_t u = 0; u < n; ++u) {
          const float* v = vp + u * a.v_token_stride + x;
          const float w = sj[u];
          b0 += w * load8(v);
          b1 += w * load8(v + 8);
          b2 += w * load8(v + 16);
          b3 += w * load8(v + 24);
        }
        store8(acc_j + x, b0);
        store8(acc_j + x + 8, b1);
        store8(acc_j + x + 16, b2);
        store8(acc_j + x + 24, b3);
      }
      for (; x < d8; x += 8) {
        v8f blk = load8(acc_j + x) * alpha;
        for (std::int64_t u = 0; u < n; ++u) blk += sj[u] * load8(vp + u * a.v_token_stride + x);
        store8(acc_j + x, blk);
      }
      for (; x < d; ++x) {
        float o = acc_j[x] * alpha;
        for (std::int64_t t = 0; t < n; ++t) o += sj[t] * vp[t * a.v_token_stride + x];
        acc_j[x] = o;
      }
      l[j] = l[j] * alpha + sum;
      m[j] = new_m;
    }
  }
  for (std::int64_t j = 0; j < n_rep; ++j) {
    float* o = a.out + token * a.out_token_stride + (g * n_rep + j) * a.out_head_stride;
    const float inv = 1.0f / l[j];
    for (std::int64_t x = 0; x < d; ++x) o[x] = acc[j * d + x] * inv;
  }
}

}  // namespace

Status paged_decode_attention(const PagedDecodeArgs& args) {
  Status st = check(args);
  if (!st.ok() || args.rows == 0) return st;
  PagedDecodeArgs a = args;
  // Query heads per item are bounded by the stack arrays in attend_item: a larger group
  // becomes several pseudo kv heads that read the same K/V (same result, more items).
  std::int64_t split = 1;
  while (a.heads / (a.kv_heads * split) > 16 || (a.heads / a.kv_heads) % split != 0) ++split;
  const std::int64_t n_rep = a.heads / a.kv_heads;
  const std::int64_t sub = n_rep / split;
  const std::int64_t items = a.rows * a.kv_heads * split;
  const int workers = parallel_workers(items, a.threads);
  const std::int64_t scratch_floats = sub * (a.page_tokens + a.head_dim);
  std::unique_ptr<float[]> scratch(new (std::nothrow) float[static_cast<std::size_t>(scratch_floats * workers)]);
  if (!scratch) return OutOfMemory("paged_decode_attention: no memory for the workers' scratch");
  run_parallel(items, a.threads, [&](int w, std::int64_t i) {
    PagedDecodeArgs item = a;
    item.heads = sub;
    item.kv_heads = 1;
    const std::int64_t r = i / (a.kv_heads * split);
    const std::int64_t rest = i % (a.kv_heads * split);
    const std::int64_t g = rest / split, part = rest % split;
    // Address the item as a one-kv-head problem: shift the query/output head base and the
    // K/V head base, so attend_item sees heads [0, sub) over kv head 0.
    item.query = a.query + (g * n_rep + part * sub) * a.q_head_stride;
    item.out = a.out + (g * n_rep + part * sub) * a.out_head_stride;
    item.key_cache = a.key_cache + g * a.k_head_stride;
    item.value_cache = a.value_cache + g * a.v_head_stride;
    attend_item(item, r, 0, scratch.get() + w * scratch_floats);
  });
  return Status::Ok();
}

}  // namespace ekv
