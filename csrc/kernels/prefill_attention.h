// prefill_attention.h — causal attention of a prompt chunk over its sequence's K/V (no torch).
//
// A chunk of `queries` tokens at positions [q_start, q_start + queries) attends causally over
// the sequence's first q_start + queries tokens: query i sees keys [0, q_start + i]. The K/V
// are read either from the step's new K/V (contiguous rows, a chunk that starts at 0) or
// through the sequence's page table (a later chunk, or a prompt whose prefix was cached).
//
// Why a kernel of our own: on CPU, torch's flash attention multiplies its blocks through the
// BLAS, which on some CPUs does not use the widest vector unit, and prefill attention was the
// largest part of a prompt's forward (benchmarks/RESULTS.md). Here each kv head's keys are
// packed transposed once per call, and blocks of query rows are scored against blocks of 16
// keys held in registers, with the softmax online (float32 throughout).
#pragma once

#include <cstdint>

#include "core/status.h"

namespace ekv {

// Everything the kernel reads and writes, as raw pointers with element strides (float32
// elements, not bytes). The innermost (head_dim) stride of every tensor must be 1.
struct CausalPrefillArgs {
  float* out = nullptr;          // query i, head h at out + i*out_token_stride + h*out_head_stride
  const float* query = nullptr;  // same addressing with q_token_stride / q_head_stride
  std::int64_t q_token_stride = 0, q_head_stride = 0;
  std::int64_t out_token_stride = 0, out_head_stride = 0;
  std::int64_t queries = 0;  // tokens in the chunk (>= 0)
  std::int64_t q_start = 0;  // position of the chunk's first token (>= 0)

  // Key t (t < q_start + queries), kv head g:
  //   contiguous (page_table null): key + t*k_token_stride + g*k_head_stride;
  //   paged: key + page_table[t / page_tokens]*k_page_stride + (t % page_tokens)*k_token_stride
  //          + g*k_head_stride. Values alike.
  const float* key = nullptr;
  const float* value = nullptr;
  std::int64_t k_page_stride = 0, k_token_stride = 0, k_head_stride = 0;
  std::int64_t v_page_stride = 0, v_token_stride = 0, v_head_stride = 0;
  const void* page_table = nullptr;  // [table_pages] page ids, or null for contiguous K/V
  int table_index_bytes = 8;         // 4 (int32) or 8 (int64)
  std::int64_t table_pages = 0;      // entries in page_table
  std::int64_t page_tokens = 0;
  std::int64_t num_pages = 0;  // valid page ids are [0, num_pages)

  std::int64_t heads = 0;  // query heads; heads % kv_heads == 0 (grouped-query attention)
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
  float scale = 1.0f;
  int threads = 1;  // worker threads including the caller (>= 1)
  // Which code to run: 0 the best this CPU has; 1 portable; 3 x86-64-v3 (AVX2, FMA); 4
  // x86-64-v4 (AVX-512). A level the CPU (or the build) lacks is an error.
  int isa = 0;
};

// Validates every argument (shapes, strides, page ids) before touching the output, then
// computes softmax(q k^T * scale, causal) v for every query and head.
Status causal_prefill_attention(const CausalPrefillArgs& args);

// The levels causal_prefill_attention can run here, best first (each one of 4, 3, 1).
int prefill_isa_levels(int* levels, int capacity);

}  // namespace ekv
